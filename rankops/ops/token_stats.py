"""token_stats: per-token rank, tie count and log-softmax score of the target.

The one dispatch seam for every backend. Definitions (DESIGN.md section 1):
    rank = #{v : z_v > z_t}            strict, 0-based, on the raw logits
    ties = #{v != t : z_v == z_t}
    logp = z_t - logsumexp(z)          natural log, accumulated in fp32 or better
"""
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from rankops import _ext
from rankops.ops import reference

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TokenStats(NamedTuple):
    """Per-token statistics, each of the targets' shape.

    rank: int64, -1 where ignored.  ties: int64, 0 where ignored.
    logp: float32 (float64 for float64 logits), 0.0 where ignored.
    """
    rank: torch.Tensor
    ties: torch.Tensor
    logp: torch.Tensor


def _triton_usable() -> bool:
    # Triton runs on CUDA devices, and on the CPU under its interpreter (TRITON_INTERPRET=1).
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or triton_interpreted()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list:
    """The backends this installation can run here, fastest first ("torch" is always present).

    "cuda": the CUDA kernels, when built and a GPU is present. "triton": the Triton kernels, on
    a GPU or under TRITON_INTERPRET=1 (then on CPU tensors). "cpu": the C++ kernel."""
    names = []
    if _ext.has_cuda_kernel() and torch.cuda.is_available():
        names.append("cuda")
    if _triton_usable():
        names.append("triton")
    if _ext.has_cpu_kernel():
        names.append("cpu")
    names.append("torch")
    return names


def check_inputs(logits, targets, ignore_index, vocab_size, validate=True) -> int:
    """Validates the arguments of token_stats; returns the number of columns that count.

    With validate=False the target range (a device sync on a GPU) is not checked."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16, "
                        "float16 or float64")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape [N, V] or [..., V], got shape {tuple(logits.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but logits of shape "
                         f"{tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets must be on the same device, got logits on "
                         f"{logits.device} and targets on {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    n_vocab = logits.shape[-1]
    if n_vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if targets.numel() == 0:
        raise ValueError(f"empty input: logits of shape {tuple(logits.shape)} hold no tokens")
    if vocab_size is None:
        n_cols = n_vocab
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
        if not 1 <= vocab_size <= n_vocab:
            raise ValueError(f"vocab_size must be in [1, {n_vocab}] (the logits' last dimension), "
                             f"got {vocab_size}")
        n_cols = vocab_size
    if not validate:
        return n_cols
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_cols))
    if bool(bad.any()):
        pos = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                         f"found {int(targets[pos])} at position {pos}")
    return n_cols


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    on_gpu = logits.device.type == "cuda"
    if backend == "auto":
        if logits.dtype not in KERNEL_DTYPES:
            return "torch"
        for name in (("cuda", "triton") if on_gpu else ("cpu",)):
            if name in available:
                return name
        return "torch"
    if backend not in available:
        raise ValueError(f"backend {backend!r} is not available in this installation "
                         f"(available: {available})")
    if backend != "torch" and logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend {backend!r} supports float32, bfloat16 and float16 logits, got "
                        f"{logits.dtype}; use backend='torch' for float64")
    if backend == "cpu" and logits.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got logits on {logits.device}")
    if backend == "cuda" and not on_gpu:
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got logits on {logits.device}")
    if backend == "triton" and not on_gpu and not (logits.device.type == "cpu" and triton_interpreted()):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or CPU tensors under "
                         f"TRITON_INTERPRET=1), got logits on {logits.device}")
    return backend


def row_position(row: int, lead_shape) -> tuple:
    """The index, in the targets' shape, of flat row `row`."""
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(lead_shape)))


def nonfinite_error(row: int, lead_shape) -> ValueError:
    pos = row_position(row, lead_shape)
    return ValueError(f"logits contain a non-finite value (NaN or +-inf) in the row at position "
                      f"{pos}; pass check_finite=False to compute with IEEE semantics anyway")


def check_sync_options(check_finite, validate):
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    if check_finite and not validate:
        raise ValueError("check_finite=True needs validate=True (finding non-finite logits on a GPU "
                         "synchronises); pass check_finite=False as well for sync-free use")


def first_flagged_row_tensor(bad: torch.Tensor) -> torch.Tensor:
    """0-d int64 on bad's device: the first row with a nonzero flag, or -1. No host sync."""
    n = bad.numel()
    rows = torch.arange(n, device=bad.device)
    first = torch.where(bad.reshape(-1) != 0, rows, n).min() if n else torch.tensor(n, device=bad.device)
    return torch.where(first == n, -1, first)


def _kernel_token_stats(logits, targets, ignore_index, n_cols, backend):
    """Runs a compiled backend: (rank, ties, logp, first non-finite kept row as a 0-d tensor)."""
    if backend == "cpu":
        rank, ties, logp, bad_row = _ext.cpu_token_stats(logits, targets, ignore_index, n_cols)
        return rank, ties, logp, torch.tensor(bad_row, dtype=torch.int64)
    rank, ties, logp, bad = _gpu_launch(backend, logits, targets, ignore_index, n_cols)
    return rank, ties, logp, first_flagged_row_tensor(bad)


def _gpu_launch(backend, logits, targets, ignore_index, n_cols, stats=None):
    """The Triton or CUDA kernels on the logits as they are (any strides); with stats, they also
    accumulate. Returns rank, ties, logp and non-finite flags of the targets' shape."""
    if backend == "triton":
        from rankops.ops import token_stats_triton
        layout = {} if stats is None else dict(rows=STATE_ROWS, logp_scale=LOGP_SCALE,
                                               logp_limit=LOGP_LIMIT)
        return token_stats_triton.launch(logits, targets, ignore_index, n_cols, stats=stats, **layout)
    return _ext.cuda_token_stats(logits, targets, ignore_index, n_cols, stats=stats)


# Registered with torch.library so torch.compile traces through the kernels (and, on a GPU,
# CUDA graphs capture them): the op is opaque to the compiler, its fake version gives shapes.
@torch.library.custom_op("rankops::token_stats", mutates_args=())
def token_stats_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rank, ties, logp, first_bad = _kernel_token_stats(logits, targets, ignore_index, n_cols, backend)
    return rank.view(targets.shape), ties.view(targets.shape), logp.view(targets.shape), first_bad


@token_stats_op.register_fake
def _(logits, targets, ignore_index, n_cols, backend):
    shape, dev = targets.shape, logits.device
    return (torch.empty(shape, dtype=torch.int64, device=dev), torch.empty(shape, dtype=torch.int64, device=dev),
            torch.empty(shape, dtype=torch.float32, device=dev), torch.empty((), dtype=torch.int64, device=dev))


# The accumulator's state layout, its one Python owner (rankops.accumulate re-exports it; the
# Triton kernels get it as arguments; C++: csrc/common/state_layout.h). Rows of the [6, V] int64
# state, and the fixed point of the logp sums.
COUNT, SUM_HI, SUM_LO, COUNT_PESS, SUM_HI_PESS, SUM_LO_PESS = STATE_ROWS = tuple(range(6))
LOGP_SCALE = 2.0 ** 40
LOGP_LIMIT = 2.0 ** 23  # |logp| * 2^40 must fit an int64


@torch.library.custom_op("rankops::accumulate_", mutates_args=("stats",))
def accumulate_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int,
                  backend: str, stats: torch.Tensor, check_finite: bool) -> torch.Tensor:
    """Adds tokens into the accumulator's int64 stats [6, V] with a compiled backend.

    Returns int64 [4] on stats' device: first kept row with a non-finite logit (-1 if none),
    first kept row whose logp cannot be accumulated (-1), tokens with ties added, tokens left
    out. cpu adds nothing if either row is found (the first only with check_finite); the GPU
    kernels add every kept token with a finite logp, and leave the rest out."""
    if backend == "cpu":
        info = _ext.cpu_accumulate(logits, targets, stats, ignore_index, n_cols, check_finite, False)
        return torch.tensor(info, dtype=torch.int64)
    rank, ties, logp, bad = _gpu_launch(backend, logits, targets, ignore_index, n_cols, stats)
    kept = rank >= 0
    left_out = kept & ~(logp.abs() < LOGP_LIMIT)  # the kernels skip these (NaN included)
    return torch.stack([first_flagged_row_tensor(kept & (bad != 0)), first_flagged_row_tensor(left_out),
                        (kept & (ties > 0) & ~left_out).sum(), left_out.sum()])


@accumulate_op.register_fake
def _(logits, targets, ignore_index, n_cols, backend, stats, check_finite):
    return torch.empty(4, dtype=torch.int64, device=stats.device)


def _run_torch(logits, targets, ignore_index, n_cols, check_finite):
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.view(-1)
    if check_finite:
        bad_row = reference.has_nonfinite_row(flat, flat_targets, ignore_index, n_cols)
        if bad_row is not None:
            raise nonfinite_error(bad_row, targets.shape)
    rank, ties, logp = reference.token_stats(flat, flat_targets, ignore_index, n_cols)
    return TokenStats(rank.view(targets.shape), ties.view(targets.shape), logp.view(targets.shape))


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
        >>> logits = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 0.5]])
        >>> s = rankops.token_stats(logits, torch.tensor([1, 0]))
        >>> s.rank.tolist(), s.ties.tolist()
        ([2, 0], [0, 2])
    """
    check_sync_options(check_finite, validate)
    n_cols = check_inputs(logits, targets, ignore_index, vocab_size, validate)
    backend = resolve_backend(backend, logits)
    targets = targets.to(torch.int64).contiguous()
    if backend == "torch":
        return _run_torch(logits, targets, ignore_index, n_cols, check_finite)
    rank, ties, logp, first_bad = token_stats_op(logits, targets, ignore_index, n_cols, backend)
    if check_finite:
        bad_row = int(first_bad)  # the one sync (a GPU's validation)
        if bad_row >= 0:
            raise nonfinite_error(bad_row, targets.shape)
    return TokenStats(rank, ties, logp)
