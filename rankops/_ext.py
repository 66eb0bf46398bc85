"""The only importer of the compiled module rankops._C, and the launchers around it.

Tensors cross into C++ as data pointers; logits as a `_C.Logits` descriptor (pointer, dtype code,
shape and strides in elements), which the kernels walk in place: any strides, up to 8 leading
dimensions without a copy. Outputs are allocated here, in the targets' (leading) shape.
"""
import torch

try:
    from rankops import _C
    IMPORT_ERROR = None
except ImportError as exc:  # a source checkout without a build: only the torch backend works
    _C = None
    IMPORT_ERROR = exc

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_LEAD_DIMS = 8  # leading dimensions the kernels walk in place; more are flattened first


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


def _require_cuda():
    C = require()
    if not has_cuda_kernel():
        raise RuntimeError("rankops was built without its CUDA kernels")
    return C


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with."""
    return require().cpu_isa()


def cpu_compiled_isas() -> list:
    """Instruction sets compiled into this build, widest first."""
    return list(require().cpu_compiled_isas())


def cpu_isa_supported(name: str) -> bool:
    return bool(require().cpu_isa_supported(name))


def set_cpu_isa(name: str) -> None:
    """Forces an instruction set ("auto" restores the widest supported); for tests and benchmarks."""
    require().set_cpu_isa(name)


def _check_rows(logits, targets, **per_row):
    """The per-row tensors the kernels read by pointer: contiguous, of the leading shape (so the
    kernels cannot read past them), of their dtype (targets int64, the others float32)."""
    lead = tuple(logits.shape[:-1])
    if logits.dtype not in DTYPE_CODES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    for name, t in dict(targets=targets, **per_row).items():
        dtype = torch.int64 if name == "targets" else torch.float32
        if t is not None and (tuple(t.shape) != lead or t.dtype != dtype or not t.is_contiguous()
                              or t.device != logits.device):
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {lead} on "
                             f"{logits.device}")


def _lead_view(logits, targets, *others):
    """logits with at most MAX_LEAD_DIMS leading dims (a reshape beyond that), and the
    per-row tensors to match."""
    if logits.dim() - 1 <= MAX_LEAD_DIMS:
        return (logits, targets) + others
    flat = logits.reshape(-1, logits.shape[-1])
    return (flat, targets.reshape(-1)) + tuple(None if t is None else t.reshape(-1) for t in others)


def _describe(logits, n_cols):
    return _C.Logits(data=logits.data_ptr(), dtype=DTYPE_CODES[logits.dtype], shape=logits.shape,
                     strides=logits.stride(), n_cols=n_cols)


def _bad_target_position(targets, row):
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(targets.shape)))
    return int(targets.reshape(-1)[row]), pos


def _bad_target_error(targets, row, ignore_index, n_cols):
    value, pos = _bad_target_position(targets, row)
    return ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                      f"found {value} at position {pos}")


def _outputs(targets, device):
    rank = torch.empty(targets.shape, dtype=torch.int64, device=device)
    return rank, torch.empty_like(rank), torch.empty(targets.shape, dtype=torch.float32, device=device)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def cpu_token_stats(logits, targets, ignore_index, n_cols, target_logit=None):
    """logits [..., V] CPU, any strides; targets int64 contiguous of the leading shape;
    target_logit (optional) float32 contiguous of the leading shape: the external target-logit
    mode (targets then only mark ignored rows, ties count every equal value).

    Returns (rank, ties, logp, first non-finite kept row or -1); a target outside [0, n_cols)
    other than ignore_index raises ValueError before any logit is read (not with target_logit)."""
    C = require()
    _check_rows(logits, targets, target_logit=target_logit)
    rank, ties, logp = _outputs(targets, "cpu")
    if targets.numel() == 0:
        return rank, ties, logp, -1
    z, t, lt = _lead_view(logits, targets, target_logit)
    nonfinite_row, bad_target_row = C.token_stats(
        logits=_describe(z, n_cols), targets=t.data_ptr(), ignore_index=ignore_index,
        rank=rank.data_ptr(), ties=ties.data_ptr(), logp=logp.data_ptr(), target_logit=_ptr(lt),
        n_threads=torch.get_num_threads())
    if bad_target_row >= 0:
        raise _bad_target_error(targets, bad_target_row, ignore_index, n_cols)
    return rank, ties, logp, nonfinite_row


def cpu_accumulate(logits, targets, stats, ignore_index, n_cols, check_finite, leave_out):
    """Adds the tokens into the accumulator's state stats ([6, V] int64 contiguous CPU), in place.

    All or nothing unless leave_out: nothing is added when check_finite finds a kept row with a
    non-finite logit, or when a kept token's logp cannot be accumulated (NaN, |logp| >= 2^23).
    leave_out (needs check_finite=False) adds the others and counts those in n_skipped. The
    state's lo words come back carry-normalised. A bad target raises ValueError, adding nothing.

    Returns (first non-finite kept row, first row whose logp cannot be accumulated, n_tied,
    n_skipped), -1 where none; n_tied counts the added tokens with ties > 0."""
    C = require()
    if stats.dtype != torch.int64 or not stats.is_contiguous() or stats.device.type != "cpu" \
            or stats.dim() != 2 or stats.shape[0] != 6:
        raise ValueError("stats must be a contiguous CPU int64 tensor of shape [6, V]")
    if leave_out and check_finite:
        raise ValueError("leave_out=True needs check_finite=False")
    _check_rows(logits, targets)
    if targets.numel() == 0:
        return -1, -1, 0, 0
    z, t = _lead_view(logits, targets)
    nonfinite_row, bad_target_row, bad_logp_row, n_tied, n_skipped = C.accumulate(
        logits=_describe(z, n_cols), targets=t.data_ptr(), ignore_index=ignore_index,
        stats=stats.data_ptr(), hist_len=stats.shape[1], check_finite=check_finite,
        leave_out=leave_out, n_threads=torch.get_num_threads())
    if bad_target_row >= 0:
        raise _bad_target_error(targets, bad_target_row, ignore_index, n_cols)
    return nonfinite_row, bad_logp_row, n_tied, n_skipped


def cuda_token_stats(logits, targets, ignore_index, n_cols, target_logit=None, stats=None):
    """logits [..., V] CUDA, any strides; targets int64 contiguous of the leading shape;
    target_logit as for cpu_token_stats. Enqueued on the current stream, no sync; a target
    outside [0, n_cols) comes back as an ignored row.

    With stats ([6, V] int64 contiguous, not with target_logit), also adds every kept token
    whose |logp| < 2^23 (integer atomics; the caller normalises the carry).
    Returns rank, ties, logp and int32 flags (1 where a kept row holds NaN or +-inf), all of the
    leading shape."""
    C = _require_cuda()
    _check_rows(logits, targets, target_logit=target_logit)
    if stats is not None and (stats.dtype != torch.int64 or not stats.is_contiguous()
                              or stats.dim() != 2 or stats.shape[0] != 6 or stats.device != logits.device):
        raise ValueError("stats must be a contiguous int64 tensor of shape [6, V] on the logits' device")
    if stats is not None and target_logit is not None:
        raise ValueError("stats cannot be combined with target_logit: per-shard ranks are partial")
    device = logits.device
    rank, ties, logp = _outputs(targets, device)
    nonfinite = torch.empty(targets.shape, dtype=torch.int32, device=device)
    if targets.numel() == 0:
        return rank, ties, logp, nonfinite
    z, t, lt = _lead_view(logits, targets, target_logit)
    n_rows = targets.numel()
    workspace = torch.empty(C.cuda_workspace_bytes(n_rows=n_rows, n_cols=n_cols),
                            dtype=torch.uint8, device=device)
    C.cuda_token_stats(
        logits=_describe(z, n_cols), targets=t.data_ptr(), ignore_index=ignore_index,
        rank=rank.data_ptr(), ties=ties.data_ptr(), logp=logp.data_ptr(),
        nonfinite=nonfinite.data_ptr(), workspace=workspace.data_ptr(),
        workspace_bytes=workspace.numel(), stream=torch.cuda.current_stream(device).cuda_stream,
        target_logit=_ptr(lt), stats=_ptr(stats), hist_len=0 if stats is None else stats.shape[1])
    return rank, ties, logp, nonfinite


def _check_grad(logits, targets, lse, scale, grad):
    _check_rows(logits, targets, lse=lse, scale=scale)
    if not grad.is_contiguous() or grad.dtype != logits.dtype or grad.shape != logits.shape \
            or grad.device != logits.device:
        raise ValueError("grad must be a contiguous tensor of the logits' shape, dtype and device")


def cpu_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad):
    """Writes scale * (softmax - onehot) into grad, zeros past n_cols and in ignored rows.

    logits [..., V] CPU, any strides; targets int64, lse and scale float32, all contiguous of the
    leading shape; grad contiguous, the logits' shape and dtype. A bad target raises ValueError."""
    C = require()
    _check_grad(logits, targets, lse, scale, grad)
    if targets.numel() == 0:
        return
    z, t, lse_, scale_ = _lead_view(logits, targets, lse, scale)
    bad_target_row = C.softmax_grad(
        logits=_describe(z, n_cols), targets=t.data_ptr(), ignore_index=ignore_index,
        lse=lse_.data_ptr(), scale=scale_.data_ptr(), grad=grad.data_ptr(),
        n_threads=torch.get_num_threads())
    if bad_target_row >= 0:  # the message softmax_grad has always given, with value and position
        value, pos = _bad_target_position(targets, bad_target_row)
        raise ValueError(f"targets: row {bad_target_row} is outside [0, {n_cols}) and not "
                         f"ignore_index={ignore_index}: found {value} at position {pos}")


def cuda_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad):
    """As cpu_softmax_grad on CUDA tensors, enqueued on the current stream, no sync; an
    out-of-range target (unvalidated input) gives its row zeros."""
    C = _require_cuda()
    _check_grad(logits, targets, lse, scale, grad)
    if targets.numel() == 0:
        return
    z, t, lse_, scale_ = _lead_view(logits, targets, lse, scale)
    C.cuda_softmax_grad(
        logits=_describe(z, n_cols), targets=t.data_ptr(), ignore_index=ignore_index,
        lse=lse_.data_ptr(), scale=scale_.data_ptr(), grad=grad.data_ptr(),
        stream=torch.cuda.current_stream(logits.device).cuda_stream)


# The fused output layer's block steps (csrc/cpu/token_stats.h; rankops/ops/linear_token_stats.py):
# a row's statistics are kept as the CPU kernel's own per-slice partials in byte buffers, so a
# row folded from its blocks gets exactly what cpu_token_stats gives on the whole row.

def cpu_slice_cols() -> int:
    """Columns per slice of the CPU kernel's rows: blocks must start at multiples of this."""
    return int(require().slice_cols)


def cpu_partials(n: int) -> torch.Tensor:
    """An uninitialised buffer for n row/slice partials."""
    return torch.empty(n * require().partial_bytes, dtype=torch.uint8)


def _check_partials(buf, n, name):
    if buf.dtype != torch.uint8 or not buf.is_contiguous() or buf.device.type != "cpu" \
            or buf.numel() < n * _C.partial_bytes:
        raise ValueError(f"{name} must be a contiguous CPU uint8 buffer of at least {n} partials")


def cpu_block_partials(logits, target_logit, slices) -> int:
    """Each slice's partial of a block of logits [n, w] (CPU, any strides; the block starts at a
    multiple of cpu_slice_cols() in its rows), against target_logit ([n] float32 contiguous),
    into slices (cpu_partials of n * ceil(w / cpu_slice_cols())). Returns the slices per row."""
    C = require()
    n_rows, width = logits.shape
    n_slices = -(-width // C.slice_cols)
    if logits.dtype not in DTYPE_CODES or logits.device.type != "cpu":
        raise TypeError(f"logits must be float32, bfloat16 or float16 on the CPU, got {logits.dtype} "
                        f"on {logits.device}")
    if target_logit.shape != (n_rows,) or target_logit.dtype != torch.float32 \
            or not target_logit.is_contiguous():
        raise ValueError(f"target_logit must be a contiguous float32 tensor of shape ({n_rows},)")
    _check_partials(slices, n_rows * n_slices, "slices")
    if n_rows:
        C.block_partials(logits=_describe(logits, width), target_logit=target_logit.data_ptr(),
                         slices=slices.data_ptr(), n_threads=torch.get_num_threads())
    return n_slices


def cpu_fold_partials(running, slices, n_rows, n_slices, started) -> None:
    """Merges slices [n_rows, n_slices] into running [n_rows] in slice order (started=False: the
    first slice becomes the running partial)."""
    C = require()
    _check_partials(running, n_rows, "running")
    _check_partials(slices, n_rows * n_slices, "slices")
    if n_rows:
        C.fold_partials(running=running.data_ptr(), slices=slices.data_ptr(), n_rows=n_rows,
                        n_slices=n_slices, started=started, n_threads=torch.get_num_threads())


def cpu_finish_partials(running, target_logit):
    """(rank, ties, logp, first row holding a non-finite logit or -1) from the merged partials
    [n] and the target logits ([n] float32 contiguous), as cpu_token_stats finishes a row."""
    C = require()
    n_rows = target_logit.numel()
    _check_partials(running, n_rows, "running")
    if target_logit.dtype != torch.float32 or not target_logit.is_contiguous() or target_logit.dim() != 1:
        raise ValueError("target_logit must be a contiguous 1-d float32 tensor")
    rank, ties, logp = _outputs(target_logit, "cpu")
    first_bad = -1
    if n_rows:
        first_bad = C.finish_partials(running=running.data_ptr(), target_logit=target_logit.data_ptr(),
                                      n_rows=n_rows, rank=rank.data_ptr(), ties=ties.data_ptr(),
                                      logp=logp.data_ptr(), n_threads=torch.get_num_threads())
    return rank, ties, logp, first_bad
