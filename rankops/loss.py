"""The compensated training loss of the paper (section 6.2): L = CE + lam * Conf.

Over a batch of N kept tokens with ranks k_i and log-probabilities logp_i (docs/DESIGN.md, "Definitions"),
with n_k the tokens of rank k, P(k) = n_k / N, S(k) = exp(mean logp of rank k), Z = sum_k S(k)
and Q(k) = S(k) / Z:

    L = -(1/N) sum_i logp_i + lam * log Z

Ranks are piecewise constant in the logits, so wherever they do not change (almost everywhere)

    dL/dlogp_i = -w_i / N,   w_i = 1 - lam * Q(k_i) / P(k_i)

and the gradient with respect to the logits is a per-token weighted cross-entropy gradient,
(w_i / N) (softmax(z_i) - onehot(t_i)). The weights average 1 - lam and can be negative.

Per token, L splits exactly as (1/N) sum_i l_i with

    l_i = -logp_i + lam * (Q(k_i) / P(k_i)) * (logp_i - log Q(k_i)),

because sum_i (Q/P)(k_i) logp_i = N (log Z - H(Q)) and sum_i (Q/P)(k_i) log Q(k_i) = -N H(Q).
These l_i are what reduction="none" returns.

The forward pass is one read of the logits by the fused token_stats kernel (rank, logp); the
backward pass is one more read and the write of the gradient (rankops.ops.softmax_grad). The
per-rank statistics are [V]-long float64 vectors built with scatter-adds: no host sync unless
validation asks for one.

compensated_linear_cross_entropy is the same loss of the logits hidden @ weight.T + bias,
never held: rank and logp come from linear_token_stats' block path, and the backward
(rankops.ops.linear_softmax_grad) recomputes the logits one vocabulary block at a time and
returns the gradients of hidden, weight and bias. Both share _loss_options (the checks) and
_loss_and_weights (value, weights, running statistics).
"""
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from rankops.ops.common import RowOptions, prepare, prepare_linear, raise_if_nonfinite
from rankops.ops.linear_softmax_grad import default_block, linear_softmax_grad, target_logits
from rankops.ops.linear_token_stats import linear_token_stats_op
from rankops.ops.softmax_grad import softmax_grad
from rankops.ops.token_stats import token_stats_op

REDUCTIONS = ("mean", "sum", "none")


class RunningRankStats:
    """Running (exponentially decayed) per-rank statistics, for weights that look past one batch.

    Holds count[k] and sum_logp[k] for k in [0, vocab_size) as float64 sums decayed by `decay`
    per update: after a batch, count <- decay * count + n_k(batch), and likewise for the sums.
    P(k) and Q(k) are read from these sums; the decay cancels in the per-rank means, so
    the estimate needs no bias correction. Pass the same object to every training step
    (and save it with state_dict() alongside the optimizer).

    Example:
        >>> running = rankops.RunningRankStats(vocab_size=50257, decay=0.99)
        >>> loss = rankops.compensated_cross_entropy(logits, labels, 0.5, running=running)
    """

    def __init__(self, vocab_size: int, *, decay: float = 0.99, device=None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        _check_decay(decay, "decay")
        self.vocab_size = vocab_size
        self.decay = float(decay)
        device = torch.device("cpu" if device is None else device)
        self.count = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.sum_logp = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.n_updates = 0

    def update(self, count: torch.Tensor, sum_logp: torch.Tensor) -> None:
        """Decays the state and adds one batch's per-rank counts and logp sums ([V] each)."""
        if count.shape != self.count.shape or sum_logp.shape != self.sum_logp.shape:
            raise ValueError(f"per-rank statistics of length {count.shape[-1]} do not fit running "
                             f"statistics of vocab_size={self.vocab_size}")
        if count.device != self.count.device:
            self.count = self.count.to(count.device)
            self.sum_logp = self.sum_logp.to(count.device)
        self.count.mul_(self.decay).add_(count)
        self.sum_logp.mul_(self.decay).add_(sum_logp)
        self.n_updates += 1

    def state_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "decay": self.decay, "count": self.count.clone(),
                "sum_logp": self.sum_logp.clone(), "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        """Replaces the state with a state_dict()'s, after checking it could have been produced
        by updates: vocab_size matches, decay in [0, 1], counts >= 0, logp sums <= 0 and zero
        where the count is, everything finite, n_updates >= 0. On error nothing changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("vocab_size", "decay", "count", "sum_logp", "n_updates") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["vocab_size"] != self.vocab_size or isinstance(state["vocab_size"], bool):
            raise ValueError(f"state has vocab_size={state['vocab_size']!r}, this object "
                             f"{self.vocab_size}")
        _check_decay(state["decay"], "state['decay']")
        n_updates = state["n_updates"]
        if isinstance(n_updates, bool) or not isinstance(n_updates, int) or n_updates < 0:
            raise ValueError(f"state['n_updates'] must be an int >= 0, got {n_updates!r}")
        arrays = {}
        for key in ("count", "sum_logp"):
            x = state[key]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != (self.vocab_size,):
                raise ValueError(f"state[{key!r}] must be a floating-point tensor of shape ({self.vocab_size},)")
            x = x.detach().to(torch.float64)
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"state[{key!r}] holds NaN or infinite values")
            arrays[key] = x
        count, sum_logp = arrays["count"], arrays["sum_logp"]
        if bool((count < 0).any()) or bool((sum_logp > 0).any()) or bool(((count == 0) & (sum_logp != 0)).any()):
            raise ValueError("state: counts must be >= 0 and logp sums <= 0, zero where the count is")
        self.decay = float(state["decay"])
        self.count = count.to(self.count.device).contiguous().clone()
        self.sum_logp = sum_logp.to(self.count.device).contiguous().clone()
        self.n_updates = n_updates

    def __repr__(self) -> str:
        return (f"RunningRankStats(vocab_size={self.vocab_size}, decay={self.decay}, "
                f"n_updates={self.n_updates})")


def _check_decay(decay, name: str) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {decay!r}")


def rank_ratio(count: torch.Tensor, sum_logp: torch.Tensor):
    """Per-rank log Q(k) and Q(k)/P(k) from per-rank counts and logp sums ([V] float64).

    Ranks that never occur get log Q = -inf and ratio 0 (no token will read them)."""
    seen = count > 0
    mean_logp = torch.where(seen, sum_logp / torch.where(seen, count, 1.0), float("-inf"))  # log S(k)
    log_q = mean_logp - torch.logsumexp(mean_logp, dim=0)
    ratio = torch.where(seen, torch.exp(log_q) * count.sum() / torch.where(seen, count, 1.0), 0.0)
    return log_q, ratio


def _check_options(lam, reduction, num_items_in_batch, min_weight, running, n_cols):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float, got {lam!r}")
    if lam != lam or abs(lam) == float("inf"):
        raise ValueError(f"lam must be finite, got {lam}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError("num_items_in_batch divides a reduced loss; it cannot be used with "
                             "reduction='none'")
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, torch.Tensor)):
            raise TypeError(f"num_items_in_batch must be an int or a tensor, got {num_items_in_batch!r}")
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must hold one number, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if isinstance(num_items_in_batch, torch.Tensor) and (
                num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex()):
            raise TypeError(f"num_items_in_batch must hold a number, got dtype {num_items_in_batch.dtype}")
        if isinstance(num_items_in_batch, int) and num_items_in_batch < 1:
            raise ValueError(f"num_items_in_batch must be >= 1, got {num_items_in_batch}")
    if min_weight is not None and (isinstance(min_weight, bool) or not isinstance(min_weight, (int, float))):
        raise TypeError(f"min_weight must be a float or None, got {min_weight!r}")
    if min_weight is not None and not math.isfinite(min_weight):
        raise ValueError(f"min_weight must be finite (or None), got {min_weight}")
    if running is not None:
        if not isinstance(running, RunningRankStats):
            raise TypeError(f"running must be a RunningRankStats or None, got {type(running).__name__}")
        if running.vocab_size != n_cols:
            raise ValueError(f"running has vocab_size={running.vocab_size} but the logits have "
                             f"{n_cols} columns that count (vocab_size)")


def _forward_stats(logits, targets, rows: RowOptions):
    """(rank, logp, lse, first non-finite row as a 0-d tensor), each of the targets' shape."""
    rank, _, logp, first_bad = token_stats_op(logits, targets, rows.ignore_index, rows.n_cols, rows.backend)
    # logp = z_t - lse, so lse comes back from one gather of the target logits (exact upcast).
    keep = rank >= 0
    z_t = logits.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1).to(logp.dtype)
    lse = torch.where(keep, z_t - logp, 0.0)
    return rank, logp, lse, first_bad


@dataclass(frozen=True)
class LossOptions:
    """The compensated loss's options, as they travel from the public function to the backward."""
    lam: float
    reduction: str
    min_weight: Optional[float]
    rows: RowOptions


def _per_rank(rank, logp, n_cols):
    """Per-rank token counts and logp sums of one batch, [n_cols] float64 each, sync-free."""
    keep = rank >= 0
    index = torch.where(keep, rank, 0).reshape(-1)
    zeros = torch.zeros(n_cols, dtype=torch.float64, device=rank.device)
    count = zeros.index_add(0, index, keep.reshape(-1).to(torch.float64))
    sum_logp = zeros.index_add(0, index, torch.where(keep, logp, 0.0).reshape(-1).to(torch.float64))
    return count, sum_logp


def _loss_and_weights(rank, logp, opt: LossOptions, num_items, running, out_dtype):
    """The loss from the per-token rank and logp, shared by every compensated loss.

    Returns (loss: 0-d, or per token for reduction "none", in out_dtype; the per-token weights
    w_i of the backward, float64, 0 on ignored tokens; the divisor of the summed loss, or None).
    Updates `running` with this batch's per-rank statistics."""
    keep = rank >= 0
    count, sum_logp = _per_rank(rank, logp, opt.rows.n_cols)
    log_q, ratio = rank_ratio(count, sum_logp)           # the batch's own P and Q
    index = torch.where(keep, rank, 0)
    logp64 = logp.to(torch.float64)
    ratio_i = torch.where(keep, ratio[index], 0.0)
    per_token = torch.where(keep, -logp64 + opt.lam * ratio_i * (logp64 - log_q[index]), 0.0)
    if running is not None:
        running.update(count, sum_logp)
        _, ratio = rank_ratio(running.count, running.sum_logp)
        ratio_i = torch.where(keep, ratio[index], 0.0)
    weight = 1.0 - opt.lam * ratio_i
    if opt.min_weight is not None:
        weight = weight.clamp_min(opt.min_weight)
    weight = torch.where(keep, weight, 0.0)
    if opt.reduction == "none":
        return per_token.to(out_dtype), weight, None
    denom = num_items if num_items is not None else (keep.sum() if opt.reduction == "mean" else None)
    total = per_token.sum()
    return (total if denom is None else total / denom).to(out_dtype), weight, denom


def _loss_options(lam, reduction, num_items_in_batch, min_weight, running, targets, rows: RowOptions):
    """The option checks of every compensated loss, after its tensors' own (prepare or
    prepare_linear): returns (LossOptions, num_items_in_batch as given or as a 0-d float64
    tensor on the targets' device)."""
    _check_options(lam, reduction, num_items_in_batch, min_weight, running, rows.n_cols)
    ignore_index = rows.ignore_index
    if rows.validate and reduction == "mean" and num_items_in_batch is None \
            and not bool((targets != ignore_index).any()):
        raise ValueError(f"targets: every token equals ignore_index={ignore_index}, so the mean "
                         "loss is undefined; pass num_items_in_batch or reduction='sum'")
    num_items = num_items_in_batch
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(device=targets.device, dtype=torch.float64).reshape(())
        if rows.validate and not bool(num_items >= 1):  # a sync, as every validation on a GPU
            raise ValueError(f"num_items_in_batch must be >= 1, got {num_items.item()}")
    return LossOptions(float(lam), reduction, min_weight, rows), num_items


class _CompensatedCrossEntropy(torch.autograd.Function):
    """Forward: the loss from the fused kernel. Backward: one weighted softmax-gradient pass.

    Saved for backward: the logits (as autograd already holds them; never written), targets,
    and three [N] vectors (lse, weights, and the normaliser)."""

    @staticmethod
    def forward(ctx, logits, targets, opt: LossOptions, num_items, running):
        rows = opt.rows
        rank, logp, lse, first_bad = _forward_stats(logits, targets, rows)
        if rows.check_finite:
            raise_if_nonfinite(first_bad, targets.shape)
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        loss, weight, denom = _loss_and_weights(rank, logp, opt, num_items, running, out_dtype)
        ctx.save_for_backward(logits, targets, lse, weight)
        ctx.denom = denom
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, weight = ctx.saved_tensors
        rows = ctx.rows
        scale = weight * grad_loss.to(torch.float64)  # grad_loss: 0-d, or per token for "none"
        if ctx.denom is not None:
            scale = scale / ctx.denom
        grad = softmax_grad(logits, targets, lse, scale, rows.ignore_index, rows.n_cols, rows.backend)
        return grad, None, None, None, None


def compensated_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, lam: float, *, ignore_index: int = -100,
    reduction: str = "mean", vocab_size: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    running: Optional[RunningRankStats] = None, min_weight: Optional[float] = None,
    backend: str = "auto", check_finite: bool = True, validate: bool = True,
) -> torch.Tensor:
    """Cross-entropy plus lam times the batch's Confidence: L = CE + lam * Conf (paper 6.2).

    Args:
        logits: [N, V] or [..., V], float32, bfloat16, float16 (or float64), any strides.
            The gradient comes back in the logits' dtype; the logits are never overwritten.
        targets: integer class indices of the leading shape; ignore_index drops a token.
        lam: the weight of Confidence. lam = 0 is F.cross_entropy, in value and gradient.
        reduction: "mean" (over kept tokens, or divided by num_items_in_batch), "sum", or
            "none": per-token terms l_i whose mean is the loss (see the module docstring);
            their backward treats the batch's P and Q as fixed, so the gradient of their sum
            is exactly the gradient of the summed loss.
        vocab_size: count only the first vocab_size columns (padded output layers); the
            padded columns get zero gradient.
        num_items_in_batch: divide the summed loss by this instead of by the batch's kept
            tokens: under gradient accumulation, the kept tokens of all micro-batches (as
            transformers' Trainer passes it).
        running: a RunningRankStats: the weights' P and Q come from it (after adding this
            batch) instead of from this batch alone. The loss value is still the batch's.
        min_weight: clip the per-token weights w_i = 1 - lam Q(k)/P(k) from below (0.0 stops
            the loss from pushing correct top-ranked tokens down); None keeps them exact.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference), as token_stats.
        check_finite, validate: as token_stats; both False makes a GPU step sync-free.

    Returns:
        A 0-d float32 tensor (float64 for float64 logits), or per-token terms for "none".

    Example:
        >>> loss = rankops.compensated_cross_entropy(logits, labels, lam=0.3)
        >>> loss.backward()
    """
    targets, rows = prepare(logits, targets, ignore_index=ignore_index, vocab_size=vocab_size,
                            backend=backend, check_finite=check_finite, validate=validate)
    opt, num_items = _loss_options(lam, reduction, num_items_in_batch, min_weight, running, targets, rows)
    return _CompensatedCrossEntropy.apply(logits, targets, opt, num_items, running)


class _CompensatedLinearCrossEntropy(torch.autograd.Function):
    """The compensated loss of the logits hidden @ weight.T + bias, never held whole.

    Forward: rank and logp from linear_token_stats' block path, the loss as
    compensated_cross_entropy's, and each kept row's logsumexp as lse = z_t - logp (z_t from an
    [n, D] gather of the target rows). Backward: rankops.ops.linear_softmax_grad, block by block.
    Saved for backward: hidden, weight, bias (as autograd already holds them), and four [n_kept]
    vectors (row index, target, lse, weight)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opt: LossOptions, num_items, running, blocks):
        rows = opt.rows
        forward_block, backward_block = blocks
        rank, _, logp, first_bad = linear_token_stats_op(hidden, weight, bias, targets, rows.ignore_index,
                                                         rows.n_cols, forward_block, rows.backend)
        if rows.check_finite:
            raise_if_nonfinite(first_bad, targets.shape)
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        loss, weight_i, denom = _loss_and_weights(rank, logp, opt, num_items, running, out_dtype)
        # The backward works on the kept rows only (a host sync, as the block path's own).
        kept = torch.nonzero(rank.reshape(-1) >= 0).squeeze(1)
        h_k = hidden.reshape(-1, hidden.shape[-1])[kept]
        t_k = targets.reshape(-1)[kept]
        lse_k = target_logits(h_k, weight, bias, t_k) - logp.reshape(-1)[kept]
        ctx.save_for_backward(hidden, weight, bias, kept, t_k, lse_k, weight_i.reshape(-1)[kept])
        ctx.denom, ctx.n_cols, ctx.backward_block = denom, rows.n_cols, backward_block
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, kept, t_k, lse_k, weight_k = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_loss = grad_loss.to(torch.float64)  # 0-d, or per token for "none"
        scale = weight_k * (grad_loss.reshape(-1)[kept] if grad_loss.dim() else grad_loss)
        if ctx.denom is not None:
            scale = scale / ctx.denom
        flat = hidden.reshape(-1, hidden.shape[-1])
        block = ctx.backward_block or default_block(kept.numel(), ctx.n_cols)
        grad_h_k, grad_weight, grad_bias = linear_softmax_grad(
            flat[kept], weight, bias, t_k, lse_k, scale, ctx.n_cols, block,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        grad_hidden = None
        if need_hidden:  # ignored rows get zero
            grad_hidden = torch.zeros(flat.shape, dtype=hidden.dtype, device=hidden.device)
            grad_hidden.index_copy_(0, kept, grad_h_k.to(hidden.dtype))
            grad_hidden = grad_hidden.view(hidden.shape)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def compensated_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lam: float, *,
    bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
    vocab_size: Optional[int] = None, num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    running: Optional[RunningRankStats] = None, min_weight: Optional[float] = None,
    backend: str = "auto", check_finite: bool = True, validate: bool = True,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """compensated_cross_entropy of the output layer's logits, F.linear(hidden, weight, bias)
    [..., :vocab_size], without ever holding them: memory O(N * block + V * D), not O(N * V).

    The same loss, options and gradient as compensated_cross_entropy on those logits, with
    gradients for hidden, weight and bias (each in its own dtype; padded weight rows beyond
    vocab_size and ignored tokens get zero). lam = 0 is F.cross_entropy(F.linear(...)).

    Args:
        hidden: [..., D] the output layer's input (float32, bfloat16, float16; float64 on
            backend "torch").
        weight: [V, D] its weight (tied or not: autograd adds the embedding's gradient), and
            bias an optional [V], both in hidden's dtype.
        targets, lam, ignore_index, reduction, vocab_size, num_items_in_batch, running,
            min_weight, check_finite, validate: as compensated_cross_entropy.
        backend: the forward's, as linear_token_stats ("auto", "cpu", "torch"). The backward
            is torch matmuls block by block on any device.
        block_size: vocabulary rows per block, forward and backward (on backend "cpu" a
            multiple of 16384). Default: linear_token_stats' for the forward; for the backward
            about 2^24 / (kept tokens) rows, at least 256.

    rank and logp are linear_token_stats', exact for the logits this path computes. The
    backward recomputes each block of logits for the kept rows, in the inputs' dtype, and
    forms the softmax in fp32 with each row's logsumexp from the forward (recovered as
    z_t - logp; z_t can differ from the block's own in the last bit). Not sync-free: the kept
    rows are gathered with a host sync.

    Example:
        >>> hidden = model.model(input_ids).last_hidden_state[:, :-1]      # [B, T-1, D]
        >>> loss = rankops.compensated_linear_cross_entropy(
        ...     hidden, model.lm_head.weight, input_ids[:, 1:], lam=0.3)
        >>> loss.backward()
    """
    targets, rows, forward_block = prepare_linear(
        hidden, weight, targets, bias, ignore_index=ignore_index, vocab_size=vocab_size,
        backend=backend, check_finite=check_finite, validate=validate, block_size=block_size)
    opt, num_items = _loss_options(lam, reduction, num_items_in_batch, min_weight, running, targets, rows)
    return _CompensatedLinearCrossEntropy.apply(hidden, weight, bias, targets, opt, num_items, running,
                                                (forward_block, block_size))


class CompensatedCrossEntropy(torch.nn.Module):
    """compensated_cross_entropy as a module that keeps its options and, with
    weights="running", its RunningRankStats (saved in state_dict as buffers).

    Example:
        >>> criterion = rankops.CompensatedCrossEntropy(lam=0.3, weights="running",
        ...                                             vocab_size=50257)
        >>> loss = criterion(logits, labels)
    """

    def __init__(self, lam: float, *, weights: str = "batch", vocab_size: Optional[int] = None,
                 decay: float = 0.99, min_weight: Optional[float] = None, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", check_finite: bool = True,
                 validate: bool = True):
        super().__init__()
        if weights not in ("batch", "running"):
            raise ValueError(f"weights must be 'batch' or 'running', got {weights!r}")
        if weights == "running" and vocab_size is None:
            raise ValueError("weights='running' needs vocab_size (the length of the running statistics)")
        _check_options(lam, reduction, None, min_weight, None, 0)
        self.lam, self.weights, self.vocab_size = float(lam), weights, vocab_size
        self.min_weight, self.ignore_index, self.reduction = min_weight, ignore_index, reduction
        self.backend, self.check_finite, self.validate = backend, check_finite, validate
        self.running = RunningRankStats(vocab_size, decay=decay) if weights == "running" else None
        if self.running is not None:
            self.register_buffer("running_count", self.running.count, persistent=True)
            self.register_buffer("running_sum_logp", self.running.sum_logp, persistent=True)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.running is not None:  # keep the running object on the buffers' device
            self.running.count, self.running.sum_logp = self.running_count, self.running_sum_logp
        return out

    def forward(self, logits, targets, num_items_in_batch=None):
        # self.running shares its tensors with the buffers: _apply (.to(), .cuda()) re-points it
        # after a move, and load_state_dict copies into the buffers in place.
        loss = compensated_cross_entropy(
            logits, targets, self.lam, ignore_index=self.ignore_index, reduction=self.reduction,
            vocab_size=self.vocab_size, num_items_in_batch=num_items_in_batch, running=self.running,
            min_weight=self.min_weight, backend=self.backend, check_finite=self.check_finite,
            validate=self.validate)
        if self.running is not None:  # where update() moved them to the logits' device, follow
            self.running_count, self.running_sum_logp = self.running.count, self.running.sum_logp
        return loss

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, weights={self.weights!r}, min_weight={self.min_weight}, "
                f"reduction={self.reduction!r}")
