"""linear_token_stats: token_stats of the output layer's logits, hidden @ weight.T + bias,
computed block by block so that the [N, V] logits are never held (issue 14).

The logits are those this path computes: each one exactly once, by torch's matmul of a chunk of
hidden rows with a block of the weight's rows, in the dtype that matmul gives (bf16 inputs give
bf16 logits, as a model's lm_head would). A row's target logit is read from the same block
output as every other logit of its row, so rank and ties are exact with respect to these logits
(docs/DESIGN.md, "Definitions").

CPU backend, in one pass of matmuls: the kept rows are grouped by the vocabulary block holding
their target. For a chunk of one group, the target's block is computed first (z_t is read from
it), then every other block; each block is cut into the C++ kernel's own 16384-column slices,
whose partials (count greater, count equal, a running sum of exp, flags) are merged in slice
order and finished exactly as cpu token_stats finishes a row. Blocks start at multiples of the
slice width, so logp is bit for bit that of rankops.token_stats(backend="cpu") on the same
logits. Extra memory: one [rows_per_chunk, block_size] logits buffer and O(N) per-row values.

Triton backend (linear_token_stats_triton.py; "auto" on CUDA tensors): one fused kernel, logit
tiles by tl.dot folded into per-row partials and never written, run twice as one compiled
binary over identical tiles (pass 0: logsumexp and z_t from the tile holding the target;
pass 1: the counts against z_t). Extra memory O(N * V / block_size), block_size columns per
program.

Torch backend (the reference): the same block matmuls fill [rows, V] logits for a chunk of rows
at a time, given to rankops.token_stats' reference; O(rows_per_chunk * V) memory.

Read top-down: the public function, the torch.library op, the per-backend launch.
"""
from typing import Optional

import torch

from rankops import _ext
from rankops.ops import reference
from rankops.ops.common import first_flagged_row, prepare_linear, raise_if_nonfinite
from rankops.ops.token_stats import TokenStats

# The logits buffer of the CPU path holds at most this many elements (64 MiB in fp32):
# rows_per_chunk = BUFFER_ELEMENTS // block_size. Fewer rows make the matmuls slower (measured
# on 2 cores, D = 640: 2^22 elements cost ~35% over one big matmul, 2^23 ~20%); more rows cost
# memory. block_size defaults to two of the kernel's slices (ops/common.py, prepare_linear).
BUFFER_ELEMENTS = 1 << 24
REFERENCE_ELEMENTS = 1 << 24      # the torch backend's [rows, V] chunk


def linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                       vocab_size: Optional[int] = None, backend: str = "auto",
                       check_finite: bool = True, validate: bool = True,
                       block_size: Optional[int] = None) -> TokenStats:
    """rankops.token_stats of the logits hidden @ weight.T + bias, without holding them.

    Args:
        hidden: [..., D] hidden states (float32, bfloat16, float16; float64 on backend "torch").
        weight: [V, D] the output layer's weight (tied or not), hidden's dtype and device.
        targets: integer tensor of hidden's leading shape; ignore_index marks tokens to drop.
        bias: optional [V], hidden's dtype.
        vocab_size: count only the first vocab_size rows of weight (padded output layers).
        backend: "auto" ("triton" for CUDA tensors when Triton is importable, "cpu" for CPU
            tensors, else "torch"), "triton" (one fused kernel: logit tiles by tl.dot, folded
            into per-row statistics, never written), "cpu" (the C++ kernel, block by block) or
            "torch" (the reference). No "cuda" backend.
        check_finite, validate, ignore_index: as in rankops.token_stats.
        block_size: vocabulary rows per matmul; a multiple of 16384 on backend "cpu" (the
            kernel's slice width), default 32768. On backend "triton", vocabulary columns per
            program: a multiple of 128, default 16384.

    rank and ties are exact with respect to the logits this path computes; where every product
    is exact (integer-valued inputs, say) they equal rankops.token_stats on
    F.linear(hidden, weight, bias) bit for bit, logp included (on the same backend).

    Example:
        >>> import torch, rankops
        >>> hidden, weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 1.0]])
        >>> s = rankops.linear_token_stats(hidden, weight, torch.tensor([1, 1]))
        >>> s.rank.tolist(), s.ties.tolist()
        ([1, 0], [0, 0])
    """
    targets, opt, block_size = prepare_linear(
        hidden, weight, targets, bias, ignore_index=ignore_index, vocab_size=vocab_size,
        backend=backend, check_finite=check_finite, validate=validate, block_size=block_size)
    # A measurement, not a loss: no gradient flows (and matmuls into a buffer admit none).
    bias = None if bias is None else bias.detach()
    rank, ties, logp, first_bad = linear_token_stats_op(hidden.detach(), weight.detach(), bias, targets,
                                                        opt.ignore_index, opt.n_cols, block_size,
                                                        opt.backend)
    if check_finite:
        raise_if_nonfinite(first_bad, targets.shape)
    return TokenStats(rank, ties, logp)


@torch.library.custom_op("rankops::linear_token_stats", mutates_args=())
def linear_token_stats_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, ignore_index: int, n_cols: int, block_size: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rank, ties, logp of the targets' shape and the first kept row holding a non-finite logit
    (0-d int64, -1 if none). targets: int64 contiguous, in range or ignore_index (the caller
    checked; unchecked out-of-range targets come back as ignored rows)."""
    rank, ties, logp, first_bad = launch(hidden, weight, bias, targets, ignore_index, n_cols,
                                         block_size, backend)
    shape = targets.shape
    return rank.view(shape), ties.view(shape), logp.view(shape), first_bad


@linear_token_stats_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, n_cols, block_size, backend):
    shape, dev = targets.shape, hidden.device
    logp_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (torch.empty(shape, dtype=torch.int64, device=dev), torch.empty(shape, dtype=torch.int64, device=dev),
            torch.empty(shape, dtype=logp_dtype, device=dev), torch.empty((), dtype=torch.int64, device=dev))


def launch(hidden, weight, bias, targets, ignore_index, n_cols, block_size, backend):
    """The one call into each backend: flat (rank, ties, logp) [N] and the first non-finite
    kept row (0-d int64)."""
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    t = targets.reshape(-1)                   # [N]
    # Rows whose target is out of range (only with validate=False) are ignored rows.
    keep = (t != ignore_index) & (t >= 0) & (t < n_cols)
    if backend == "triton":
        from rankops.ops import linear_token_stats_triton
        rank, ties, logp, flags = linear_token_stats_triton.launch(h, weight, bias, t, ignore_index,
                                                                   n_cols, block_size)
        return rank, ties, logp, first_flagged_row(flags)
    if backend == "cpu":
        return _cpu(h, weight, bias, t, keep, n_cols, block_size)
    if backend == "torch":
        return _reference(h, weight, bias, t, keep, ignore_index, n_cols, block_size)
    raise ValueError(f"linear_token_stats has no backend {backend!r}")


def _logits_block(h, weight, bias, start, stop, out):
    """h @ weight[start:stop].T (+ bias[start:stop]) into out [rows, stop - start]: one logit
    per product, as F.linear computes it (addmm with a bias)."""
    w = weight[start:stop].t()
    if bias is None:
        return torch.mm(h, w, out=out)
    return torch.addmm(bias[start:stop], h, w, out=out)


def _cpu(h, weight, bias, t, keep, n_cols, block_size):
    n_rows = t.numel()
    rank = torch.full((n_rows,), -1, dtype=torch.int64)
    ties = torch.zeros(n_rows, dtype=torch.int64)
    logp = torch.zeros(n_rows, dtype=torch.float32)
    first_bad = n_rows
    rows = torch.nonzero(keep).squeeze(1)                 # kept rows, in order
    target_block = torch.div(t[rows], block_size, rounding_mode="floor")
    order = torch.argsort(target_block, stable=True)      # grouped by the block of the target
    rows, target_block = rows[order], target_block[order]
    n_blocks = -(-n_cols // block_size)
    group_sizes = torch.bincount(target_block, minlength=n_blocks).tolist()
    chunk_rows = max(1, BUFFER_ELEMENTS // block_size)
    slices_per_block = -(-block_size // _ext.cpu_slice_cols())
    buffer = torch.empty(chunk_rows * block_size, dtype=torch.result_type(h, weight))
    target_slices = _ext.cpu_partials(chunk_rows * slices_per_block)  # the target block's
    slices = _ext.cpu_partials(chunk_rows * slices_per_block)         # any other block's
    running = _ext.cpu_partials(chunk_rows)

    def block(rows_h, b):
        start, stop = b * block_size, min((b + 1) * block_size, n_cols)
        out = buffer[:rows_h.shape[0] * (stop - start)].view(rows_h.shape[0], stop - start)
        return _logits_block(rows_h, weight, bias, start, stop, out), start

    group_start = 0
    for b_target, size in enumerate(group_sizes):
        for c0 in range(group_start, group_start + size, chunk_rows):
            chunk = rows[c0:min(c0 + chunk_rows, group_start + size)]
            n = chunk.numel()
            rows_h = h[chunk]                             # [n, D], gathered once per chunk
            z, start = block(rows_h, b_target)
            z_t = z[torch.arange(n), t[chunk] - start].to(torch.float32)  # exact upcast
            n_target_slices = _ext.cpu_block_partials(z, z_t, target_slices)
            for b in range(n_blocks):                     # merged in block (= slice) order
                if b == b_target:
                    _ext.cpu_fold_partials(running, target_slices, n, n_target_slices, b > 0)
                else:
                    z, _ = block(rows_h, b)
                    n_slices = _ext.cpu_block_partials(z, z_t, slices)
                    _ext.cpu_fold_partials(running, slices, n, n_slices, b > 0)
            r, ti, lp, bad = _ext.cpu_finish_partials(running, z_t)
            rank[chunk], ties[chunk], logp[chunk] = r, ti, lp
            if bad >= 0:
                first_bad = min(first_bad, int(chunk[bad]))
        group_start += size
    return rank, ties, logp, torch.tensor(-1 if first_bad == n_rows else first_bad, dtype=torch.int64)


def _reference(h, weight, bias, t, keep, ignore_index, n_cols, block_size):
    n_rows = t.numel()
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    rank = torch.full((n_rows,), -1, dtype=torch.int64, device=h.device)
    ties = torch.zeros(n_rows, dtype=torch.int64, device=h.device)
    logp = torch.zeros(n_rows, dtype=acc, device=h.device)
    flags = torch.zeros(n_rows, dtype=torch.int32, device=h.device)
    rows = torch.nonzero(keep).squeeze(1)
    chunk_rows = max(1, REFERENCE_ELEMENTS // n_cols)
    dtype = torch.result_type(h, weight)
    for c0 in range(0, rows.numel(), chunk_rows):
        chunk = rows[c0:c0 + chunk_rows]
        rows_h = h[chunk]
        z = torch.empty(chunk.numel(), n_cols, dtype=dtype, device=h.device)  # [rows, V]
        for start in range(0, n_cols, block_size):
            stop = min(start + block_size, n_cols)
            # A column slice of z is strided: compute into a contiguous block, then copy.
            z[:, start:stop] = _logits_block(rows_h, weight, bias, start, stop, None)
        r, ti, lp, fl = reference.token_stats(z, t[chunk], ignore_index, n_cols)
        rank[chunk], ties[chunk], logp[chunk], flags[chunk] = r, ti, lp, fl
    return rank, ties, logp, first_flagged_row(flags)
