"""token_stats: per-token rank, tie count and log-softmax score of the target, in one read.

    rank = #{v : z_v > z_t}            strict, 0-based, on the raw logits
    ties = #{v != t : z_v == z_t}
    logp = z_t - logsumexp(z)          natural log, accumulated in fp32 or better

(docs/DESIGN.md, "Definitions"). Read top-down: the public function, the torch.library op, the
per-backend launch.
"""
from typing import NamedTuple, Optional

import torch

from rankops import _ext
from rankops.ops import reference
from rankops.ops.common import first_flagged_row, prepare, raise_if_nonfinite


# Other rank conventions, for comparing with tools that count differently (docs/DESIGN.md,
# "Rank conventions"): name -> (add ties?, offset), applied to kept tokens only.
RANK_CONVENTIONS = {
    "paper": (False, 0),         # 0-based, strictly greater: rankops' own rank (the paper's RBE)
    "pessimistic": (True, 0),    # 0-based, greater or equal: every tied competitor ranks first
    "one_based": (False, 1),     # 1-based, strictly greater
    "one_based_ge": (True, 1),   # 1-based, greater or equal: the target counts itself
    "vllm": (True, 1),           # vLLM's V1 engine: count of logprobs >= the target's (see DESIGN)
    "vllm_v0": (False, 1),       # vLLM's V0 engine: 1 + count of logprobs > the target's
}


class TokenStats(NamedTuple):
    """Per-token statistics, each of the targets' shape.

    rank: int64, -1 where ignored.  ties: int64, 0 where ignored.
    logp: float32 (float64 for float64 logits), 0.0 where ignored.
    """
    rank: torch.Tensor
    ties: torch.Tensor
    logp: torch.Tensor

    def rank_as(self, convention: str) -> torch.Tensor:
        """The rank in another convention (RANK_CONVENTIONS), -1 where ignored.

        "paper" is `rank`; "pessimistic" `rank + ties`; "one_based" (= "vllm_v0") `rank + 1`;
        "one_based_ge" (= "vllm") `rank + ties + 1`. These are exact on the logits. Serving
        engines count on fp32 log-probabilities instead, where two different logits can round
        to one value: their >= count can exceed `rank + ties + 1` and their > count fall below
        `rank` + 1 there (docs/DESIGN.md, "Rank conventions").

        Example:
            >>> s = rankops.token_stats(torch.tensor([[3.0, 1.0, 3.0, 5.0]]), torch.tensor([0]))
            >>> [s.rank_as(c).item() for c in ("paper", "pessimistic", "one_based", "vllm")]
            [1, 2, 2, 3]
        """
        if convention not in RANK_CONVENTIONS:
            raise ValueError(f"convention must be one of {sorted(RANK_CONVENTIONS)}, got {convention!r}")
        with_ties, offset = RANK_CONVENTIONS[convention]
        shifted = self.rank + (self.ties if with_ties else 0) + offset
        return torch.where(self.rank >= 0, shifted, self.rank)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                vocab_size: Optional[int] = None, backend: str = "auto",
                check_finite: bool = True, validate: bool = True) -> TokenStats:
    """Rank, tie count and log-probability of each target token, in one read of the logits.

    Args:
        logits: [N, V] or [..., V], float32, bfloat16, float16 (or float64), any strides.
        targets: integer tensor of the leading shape; ignore_index marks tokens to drop.
        ignore_index: such tokens get rank -1, ties 0 and logp 0.0.
        vocab_size: count only the first vocab_size columns (padded output layers).
        backend: "auto", "cuda", "triton", "cpu" (the C++ kernel) or "torch" (the reference).
        check_finite: raise on NaN or +-inf logits in kept rows (the default). With False the
            result follows IEEE arithmetic: NaN never counts as greater, and logp may be NaN.
        validate: check the targets' range (and, with check_finite, the logits) at the cost of
            a device sync on a GPU. validate=False, with check_finite=False, makes the GPU
            backends sync-free (for CUDA graphs); out-of-range targets then come back as
            ignored rows instead of raising.

    Example:
        >>> import torch, rankops
        >>> logits = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 0.5]])
        >>> s = rankops.token_stats(logits, torch.tensor([1, 0]))
        >>> s.rank.tolist(), s.ties.tolist()
        ([2, 0], [0, 2])
    """
    targets, opt = prepare(logits, targets, ignore_index=ignore_index, vocab_size=vocab_size,
                           backend=backend, check_finite=check_finite, validate=validate)
    rank, ties, logp, first_bad = token_stats_op(logits, targets, opt.ignore_index, opt.n_cols,
                                                 opt.backend)
    if check_finite:
        raise_if_nonfinite(first_bad, targets.shape)
    return TokenStats(rank, ties, logp)


# Registered with torch.library so torch.compile traces through the kernels (and, on a GPU,
# CUDA graphs capture them): the op is opaque to the compiler, its fake version gives shapes.
@torch.library.custom_op("rankops::token_stats", mutates_args=())
def token_stats_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int,
                   backend: str, target_logit: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rank, ties, logp of the targets' shape, and the first kept row holding a non-finite
    logit (0-d int64, -1 if none). targets: int64, contiguous, checked by the caller.

    With target_logit (float32, or float64 for float64 logits; the targets' shape) the rows
    compare against it instead of reading the target's column: a row is kept wherever the
    target is not ignore_index, and ties counts every equal column (the vocabulary-parallel
    path, where the target may live on another process)."""
    rank, ties, logp, first_bad = launch(logits, targets, ignore_index, n_cols, backend, target_logit)
    shape = targets.shape
    return rank.view(shape), ties.view(shape), logp.view(shape), first_bad


@token_stats_op.register_fake
def _(logits, targets, ignore_index, n_cols, backend, target_logit=None):
    shape, dev = targets.shape, logits.device
    logp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (torch.empty(shape, dtype=torch.int64, device=dev), torch.empty(shape, dtype=torch.int64, device=dev),
            torch.empty(shape, dtype=logp_dtype, device=dev), torch.empty((), dtype=torch.int64, device=dev))


def launch(logits, targets, ignore_index, n_cols, backend, target_logit=None, stats=None, layout=None):
    """The one call into each backend: (rank, ties, logp, first non-finite kept row, 0-d).

    stats (GPU backends only): the accumulator's state, into which the kernel adds every kept
    token whose logp can be accumulated; layout: its rows and fixed point (rankops.ops.accumulate)."""
    if backend == "torch":
        flat = logits.reshape(-1, logits.shape[-1])
        t_logit = None if target_logit is None else target_logit.reshape(-1)
        rank, ties, logp, flags = reference.token_stats(flat, targets.reshape(-1), ignore_index,
                                                        n_cols, t_logit)
        return rank, ties, logp, first_flagged_row(flags)
    if backend == "cpu":
        rank, ties, logp, first_bad = _ext.cpu_token_stats(logits, targets, ignore_index, n_cols,
                                                           target_logit=target_logit)
        return rank, ties, logp, torch.tensor(first_bad, dtype=torch.int64)
    if backend == "triton":
        from rankops.ops import token_stats_triton
        rank, ties, logp, flags = token_stats_triton.launch(
            logits, targets, ignore_index, n_cols, target_logit=target_logit, stats=stats,
            **({} if layout is None else layout.kernel_constants()))
    else:
        rank, ties, logp, flags = _ext.cuda_token_stats(logits, targets, ignore_index, n_cols,
                                                        target_logit=target_logit, stats=stats)
    return rank, ties, logp, first_flagged_row(flags)
