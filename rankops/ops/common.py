"""The seam every op goes through: input checks, backend choice, and the options that travel
with a call (docs/DESIGN.md, "Layers").

A public op (token_stats, accumulate, softmax_grad, the compensated loss) calls `prepare` once;
it checks the arguments, resolves the backend and returns the targets as contiguous int64 with
one `RowOptions`. The torch.library ops below it take those options as plain scalars.
"""
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from rankops import _ext

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RowOptions:
    """What every op needs to know about its rows besides the tensors themselves.

    n_cols: the columns that count (vocab_size truncation applied). backend: resolved, never
    "auto". check_finite / validate: see rankops.token_stats."""
    ignore_index: int
    n_cols: int
    backend: str
    check_finite: bool
    validate: bool


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Looked up once, at import: this runs inside ops that torch.compile traces, and Dynamo refuses
# to trace importlib.util.find_spec (fullgraph=True failed on a GPU machine).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_usable() -> bool:
    # Triton runs on CUDA devices, and on the CPU under its interpreter (TRITON_INTERPRET=1).
    if not _TRITON_INSTALLED:
        return False
    return torch.cuda.is_available() or triton_interpreted()


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


def check_flags(check_finite, validate) -> None:
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    if check_finite and not validate:
        raise ValueError("check_finite=True needs validate=True (finding non-finite logits on a GPU "
                         "synchronises); pass check_finite=False as well for sync-free use")


def check_inputs(logits, targets, ignore_index, vocab_size) -> int:
    """Checks the tensors' types, shapes and devices; returns the number of columns that count.

    The targets' range is checked separately (check_target_range), since on a GPU it syncs."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"logits dtype {logits.dtype} is not supported; use float32, bfloat16, "
                        "float16 or float64")
    if logits.layout != torch.strided or logits.device.type not in ("cpu", "cuda"):
        raise TypeError(f"logits must be a dense (strided) tensor on a CPU or CUDA device, got "
                        f"layout {logits.layout} on {logits.device}")
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
        return n_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
    if not 1 <= vocab_size <= n_vocab:
        raise ValueError(f"vocab_size must be in [1, {n_vocab}] (the logits' last dimension), "
                         f"got {vocab_size}")
    return vocab_size


def check_target_range(targets: torch.Tensor, ignore_index: int, n_cols: int) -> None:
    """Raises if a target is outside [0, n_cols) and not ignore_index (a device sync on a GPU)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_cols))
    if bool(bad.any()):
        pos = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                         f"found {int(targets[pos])} at position {pos}")


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """The backend that will run: "auto" becomes the fastest available for the logits."""
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


def prepare(logits, targets, *, ignore_index: int, vocab_size: Optional[int], backend: str,
            check_finite: bool, validate: bool):
    """Every check an op's arguments need, in one place; returns (targets as contiguous int64,
    RowOptions). The targets' range is checked once: here (a sync on a GPU), or by the C++ kernel
    for backend "cpu" (before it reads a row, at no extra cost). With validate=False the GPU
    kernels and the reference are not checked: an out-of-range target comes back as an ignored row."""
    check_flags(check_finite, validate)
    n_cols = check_inputs(logits, targets, ignore_index, vocab_size)
    backend = resolve_backend(backend, logits)
    # Compared in int64, never in the targets' own dtype: ignore_index = -100 would wrap in uint8.
    targets = targets.to(torch.int64).contiguous()
    if validate and backend != "cpu":  # the C++ kernel checks the range itself, at no cost
        check_target_range(targets, ignore_index, n_cols)
    return targets, RowOptions(ignore_index, n_cols, backend, check_finite, validate)


def row_position(row: int, lead_shape) -> tuple:
    """The index, in the targets' shape, of flat row `row`."""
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(lead_shape)))


def nonfinite_error(row: int, lead_shape) -> ValueError:
    pos = row_position(row, lead_shape)
    return ValueError(f"logits contain a non-finite value (NaN or +-inf) in the row at position "
                      f"{pos}; pass check_finite=False to compute with IEEE semantics anyway")


def raise_if_nonfinite(first_bad: torch.Tensor, lead_shape) -> None:
    """The check_finite=True check after a kernel: first_bad is its 0-d first non-finite row
    (-1 if none). Reading it is the one host sync of a GPU's validation."""
    bad_row = int(first_bad)
    if bad_row >= 0:
        raise nonfinite_error(bad_row, lead_shape)


def first_flagged_row(flags: torch.Tensor) -> torch.Tensor:
    """0-d int64 on flags' device: the first flat row with a nonzero flag, or -1. No host sync."""
    n = flags.numel()
    rows = torch.arange(n, device=flags.device)
    first = torch.where(flags.reshape(-1) != 0, rows, n).min() if n else torch.tensor(n, device=flags.device)
    return torch.where(first == n, -1, first)


# The fused output layer (rankops/ops/linear_token_stats.py): no logits tensor, so its own checks.
LINEAR_BACKENDS = ("auto", "triton", "cpu", "torch")
TRITON_LINEAR_SPLIT = 16384  # the triton backend's default block_size (columns per program)
TRITON_LINEAR_TILE = 128     # ... and what its block_size must be a multiple of (BLOCK_N)


def _check_linear_tensors(hidden, weight, targets, bias) -> None:
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if x is None and name == "bias":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided or x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{name} must be a dense (strided) tensor on a CPU or CUDA device, got "
                            f"layout {x.layout} on {x.device}")
    if hidden.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"hidden dtype {hidden.dtype} is not supported; use float32, bfloat16, "
                        "float16 or float64")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {x.dtype}")
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden on {hidden.device}: all tensors "
                             "must be on one device")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden on {hidden.device}: all "
                         "tensors must be on one device")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [N, D] or [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, D] with D = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (V = 0)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (weight's rows), got "
                         f"{tuple(bias.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but hidden of shape "
                         f"{tuple(hidden.shape)} needs targets of shape {tuple(hidden.shape[:-1])}")
    if targets.numel() == 0:
        raise ValueError(f"empty input: hidden of shape {tuple(hidden.shape)} holds no tokens")


def _resolve_linear_backend(backend, hidden) -> str:
    if backend == "cuda":
        raise ValueError("linear_token_stats has no 'cuda' backend (issue 14); use "
                         "backend='triton' (CUDA tensors), 'cpu' (CPU tensors) or 'torch'")
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if hidden.dtype not in KERNEL_DTYPES:
            return "torch"
        if hidden.device.type == "cuda":
            # The fused Triton kernel wherever Triton can run on the GPU; else the reference.
            return "triton" if _triton_usable() else "torch"
        return "cpu" if _ext.has_cpu_kernel() else "torch"
    return resolve_backend(backend, torch.empty(0, 1, dtype=hidden.dtype, device=hidden.device))


def prepare_linear(hidden, weight, targets, bias, *, ignore_index: int, vocab_size: Optional[int],
                   backend: str, check_finite: bool, validate: bool, block_size: Optional[int]):
    """prepare() for logits given as hidden @ weight.T + bias: checks every argument and returns
    (targets as contiguous int64, RowOptions, block_size). The targets' range is checked here
    with validate=True (on every backend: the block path runs no kernel that checks it)."""
    check_flags(check_finite, validate)
    _check_linear_tensors(hidden, weight, targets, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    n_rows_w = weight.shape[0]
    n_cols = n_rows_w
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
        if not 1 <= vocab_size <= n_rows_w:
            raise ValueError(f"vocab_size must be in [1, {n_rows_w}] (weight's rows), got {vocab_size}")
        n_cols = vocab_size
    backend = _resolve_linear_backend(backend, hidden)
    slice_cols = _ext.cpu_slice_cols() if _ext.has_cpu_kernel() else 16384
    if block_size is None:
        block_size = TRITON_LINEAR_SPLIT if backend == "triton" else 2 * slice_cols
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    elif backend == "cpu" and block_size % slice_cols:
        raise ValueError(f"block_size must be a multiple of {slice_cols} on backend 'cpu' (the "
                         f"kernel's slice width, so that logp is the kernel's), got {block_size}")
    elif backend == "triton" and block_size % TRITON_LINEAR_TILE:
        raise ValueError(f"block_size must be a multiple of {TRITON_LINEAR_TILE} on backend 'triton' "
                         f"(its tile width, so that no tile straddles two programs), got {block_size}")
    targets = targets.to(torch.int64).contiguous()
    if validate:
        check_target_range(targets, ignore_index, n_cols)
    return targets, RowOptions(ignore_index, n_cols, backend, check_finite, validate), block_size
