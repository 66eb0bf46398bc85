"""The only importer of the compiled module rankops._C, and the launchers around it.

Tensors cross into C++ as data pointers with sizes and strides in elements (no libtorch link).
"""
import torch

try:
    from rankops import _C
    IMPORT_ERROR = None
except ImportError as exc:  # a source checkout without a build: only the torch backend works
    _C = None
    IMPORT_ERROR = exc

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def has_cpu_kernel() -> bool:
    return _C is not None


def has_cuda_kernel() -> bool:
    return _C is not None and bool(getattr(_C, "has_cuda", False))


def require():
    if _C is None:
        raise RuntimeError(
            f"rankops' compiled extension is not available ({IMPORT_ERROR}); "
            "install the package with `pip install .` or use backend='torch'"
        )
    return _C


def _geometry(logits: torch.Tensor):
    lead_sizes = list(logits.shape[:-1])
    lead_strides = list(logits.stride()[:-1])
    return lead_sizes, lead_strides, logits.stride(-1)


def cpu_token_stats(logits, targets, ignore_index, n_cols):
    """logits [..., V] CPU, any strides; targets int64 contiguous of the leading shape.

    Returns (rank, ties, logp, first_nonfinite_row or -1)."""
    C = require()
    lead_sizes, lead_strides, col_stride = _geometry(logits)
    rank = torch.empty(targets.shape, dtype=torch.int64)
    ties = torch.empty(targets.shape, dtype=torch.int64)
    logp = torch.empty(targets.shape, dtype=torch.float32)
    nonfinite_row, bad_target_row = C.token_stats(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], lead_sizes, lead_strides, n_cols, col_stride,
        targets.data_ptr(), ignore_index, rank.data_ptr(), ties.data_ptr(), logp.data_ptr(),
        torch.get_num_threads(),
    )
    if bad_target_row >= 0:  # the Python checks run first; this is the memory-safety net
        raise ValueError(f"targets: row {bad_target_row} is outside [0, {n_cols})")
    return rank, ties, logp, nonfinite_row


def cpu_accumulate(logits, targets, ignore_index, n_cols, stats, check_finite):
    """Adds the tokens into the accumulator's int64 stats [6, V] in place (only on success).

    Returns (first non-finite row, first row with an unaccumulable logp, n_kept, n_tied),
    -1 where none."""
    C = require()
    if stats.dtype != torch.int64 or not stats.is_contiguous() or stats.device.type != "cpu" \
            or stats.dim() != 2 or stats.shape[0] != 6:
        raise ValueError("stats must be a contiguous CPU int64 tensor of shape [6, V]")
    lead_sizes, lead_strides, col_stride = _geometry(logits)
    nonfinite_row, bad_target_row, bad_logp_row, n_kept, n_tied = C.accumulate(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], lead_sizes, lead_strides, n_cols, col_stride,
        targets.data_ptr(), ignore_index, stats.data_ptr(), stats.shape[1], check_finite,
        torch.get_num_threads(),
    )
    if bad_target_row >= 0:
        raise ValueError(f"targets: row {bad_target_row} is outside [0, {n_cols})")
    return nonfinite_row, bad_logp_row, n_kept, n_tied


def cuda_slice_cols(n_rows: int, n_cols: int) -> int:
    """Columns per CUDA block: 16384, halved (down to 2048) while there would be fewer than
    1024 blocks, so few-row inputs still fill the GPU. A function of the shape alone, so a
    given input always gets the same slices, and so the same bits."""
    slice_cols = 16384
    while slice_cols > 2048 and n_rows * -(-n_cols // slice_cols) < 1024:
        slice_cols //= 2
    return slice_cols


def cuda_token_stats(logits, targets, ignore_index, n_cols, stats=None):
    """logits [N, V] CUDA, any strides; targets [N] int64 contiguous. Enqueued on the current
    stream, no sync. With stats ([6, V] int64), also accumulates. Returns rank, ties, logp, bad."""
    C = require()
    if not has_cuda_kernel():
        raise RuntimeError("rankops was built without its CUDA kernels")
    n_rows = logits.shape[0]
    device = logits.device
    slice_cols = cuda_slice_cols(n_rows, n_cols)
    n_slices = -(-n_cols // slice_cols)
    workspace = torch.empty(C.cuda_workspace_bytes(n_rows, n_slices), dtype=torch.uint8, device=device)
    rank = torch.empty(n_rows, dtype=torch.int64, device=device)
    ties = torch.empty_like(rank)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    bad = torch.empty(n_rows, dtype=torch.int32, device=device)
    C.cuda_token_stats(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], n_rows, n_cols, logits.stride(0),
        logits.stride(1), targets.data_ptr(), ignore_index, slice_cols, workspace.data_ptr(),
        workspace.numel(), rank.data_ptr(), ties.data_ptr(), logp.data_ptr(), bad.data_ptr(),
        0 if stats is None else stats.data_ptr(), 0 if stats is None else stats.shape[1],
        torch.cuda.current_stream(device).cuda_stream,
    )
    return rank, ties, logp, bad


def cpu_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad):
    """Writes scale * (softmax - onehot) into grad (contiguous [N, V], the logits' dtype).

    logits [N, V] CPU, any strides; targets int64 [N] contiguous; lse, scale float32 [N]."""
    C = require()
    if not grad.is_contiguous() or grad.dtype != logits.dtype or grad.shape != logits.shape:
        raise ValueError("grad must be a contiguous tensor of the logits' shape and dtype")
    lead_sizes, lead_strides, col_stride = _geometry(logits)
    bad_target_row = C.softmax_grad(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], lead_sizes, lead_strides, n_cols, col_stride,
        targets.data_ptr(), ignore_index, lse.data_ptr(), scale.data_ptr(), grad.data_ptr(),
        logits.shape[-1], torch.get_num_threads(),
    )
    if bad_target_row >= 0:
        raise ValueError(f"targets: row {bad_target_row} is outside [0, {n_cols})")


def cuda_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad):
    """Writes scale * (softmax - onehot) into grad (contiguous [N, V], the logits' dtype).

    logits [N, V] CUDA, any strides; targets int64 [N] contiguous; lse, scale float32 [N]
    contiguous. Enqueued on the current stream, no sync; an out-of-range target (unvalidated
    input) gives its row zeros."""
    C = require()
    if not has_cuda_kernel():
        raise RuntimeError("rankops was built without its CUDA kernels")
    if not grad.is_contiguous() or grad.dtype != logits.dtype or grad.shape != logits.shape:
        raise ValueError("grad must be a contiguous tensor of the logits' shape and dtype")
    C.cuda_softmax_grad(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], logits.shape[0], logits.shape[1], n_cols,
        logits.stride(0), logits.stride(1), targets.data_ptr(), ignore_index, lse.data_ptr(),
        scale.data_ptr(), grad.data_ptr(), torch.cuda.current_stream(logits.device).cuda_stream,
    )


# ---- TEMPORARY (until the kernel-layer rewrite lands): the new launcher API on the old binding.
_old_cpu_token_stats, _old_cpu_accumulate = cpu_token_stats, cpu_accumulate
_old_cpu_softmax_grad = cpu_softmax_grad


def _targets_error(row, targets, ignore_index, n_cols):
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(targets.shape)))
    return ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                      f"found {int(targets.reshape(-1)[row])} at position {pos}")


def cpu_token_stats(logits, targets, ignore_index, n_cols, target_logit=None):  # noqa: F811
    if target_logit is not None:
        from rankops.ops import reference
        r, t, lp, flags = reference.token_stats(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index, n_cols, target_logit.reshape(-1))
        rows = torch.nonzero(flags)
        return r, t, lp, int(rows[0, 0]) if rows.numel() else -1
    view = logits if logits.dim() - 1 <= 8 else logits.reshape(-1, logits.shape[-1])
    try:
        return _old_cpu_token_stats(view, targets.view(view.shape[:-1]), ignore_index, n_cols)
    except ValueError:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_cols))
        raise _targets_error(int(torch.nonzero(bad.reshape(-1))[0, 0]), targets, ignore_index, n_cols)


def cpu_accumulate(logits, targets, stats, ignore_index, n_cols, check_finite, leave_out):  # noqa: F811
    view = logits if logits.dim() - 1 <= 8 else logits.reshape(-1, logits.shape[-1])
    tv = targets.view(view.shape[:-1])
    if not leave_out:
        nf, bl, _, tied = _old_cpu_accumulate(view, tv, ignore_index, n_cols, stats, check_finite)
        return nf, bl, tied, 0
    rank, ties, logp, nf = cpu_token_stats(view, tv, ignore_index, n_cols)
    rank, ties, logp = rank.reshape(-1), ties.reshape(-1), logp.reshape(-1)
    kept = rank >= 0
    ok = kept & (logp.abs() < 2.0 ** 23)
    from rankops.ops.accumulate import add_tokens
    tied = int(add_tokens(stats, rank[ok], logp[ok], ties[ok]))
    bad = torch.nonzero(kept & ~ok)
    return nf, int(bad[0, 0]) if bad.numel() else -1, tied, int((kept & ~ok).sum())


def cpu_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad):  # noqa: F811
    flat = logits.reshape(-1, logits.shape[-1])
    _old_cpu_softmax_grad(flat, targets.reshape(-1), lse.reshape(-1).contiguous(), scale.reshape(-1).contiguous(),
                          ignore_index, n_cols, grad.view(flat.shape))
