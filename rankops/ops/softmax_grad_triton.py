"""Triton kernel for softmax_grad (GPU; CPU under TRITON_INTERPRET=1).

    grad[i, v] = scale_i * (exp(z[i, v] - lse_i) - [v == t_i])   for v < n_cols, else 0

One program per (row, block of BLOCK columns): there is no reduction, so each element is one
load, one exp2 (argument pre-scaled by log2(e)), one fp32 multiply and one store rounded to
nearest even. The logits' rows are found from their own leading sizes and strides (any N-d
strided view, no reshape copy); grad is contiguous. Offsets are 64-bit. Nothing here
synchronises with the host.
"""
import torch
import triton
import triton.language as tl

from rankops.ops.token_stats_triton import _load_f32, _row_offset

MAX_BLOCK = 4096  # columns per program


@triton.jit
def _store_rounded(ptrs, g, mask, OUT: tl.constexpr):
    """Stores fp32 g rounded to nearest even. OUT 0: float32 as is. OUT 1: bf16 into int16 storage,
    rounded with integer arithmetic (the interpreter's own fp32 -> bf16 cast truncates and flushes
    subnormals): add half an ulp of the kept half, less one when the kept half is even, then drop
    the low 16 bits; NaN keeps its top bits with the quiet bit set. OUT 2: fp16 by the native cast,
    cvt.rn.f16.f32 on a GPU and numpy's float16 conversion (exact, subnormals included) in the
    interpreter."""
    if OUT == 1:
        b = g.to(tl.int32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # arithmetic shift: the sign bit stays put
        is_nan = (b & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(is_nan, (b >> 16) | 0x40, rounded)
        tl.store(ptrs, bits.to(tl.int16), mask=mask)  # keeps the low 16 bits
    elif OUT == 2:
        tl.store(ptrs, g.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, g, mask=mask)


@triton.jit
def _grad_kernel(logits_ptr, targets_ptr, lse_ptr, scale_ptr, grad_ptr, lead_sizes, lead_strides,
                 stride_col, n_cols, row_len, ignore_index, BLOCK: tl.constexpr,
                 N_LEAD: tl.constexpr, BF16_BITS: tl.constexpr, OUT: tl.constexpr):
    # Rows on grid axis 0 (up to 2^31 - 1 programs); column blocks on axis 1 (65535 at most).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(targets_ptr + row)
    # Targets outside [0, n_cols) (only possible unvalidated) make the row an ignored one: zeros,
    # and nothing is read.
    keep = (t != ignore_index) & (t >= 0) & (t < n_cols)
    in_row = cols < row_len
    # n_cols <= row_len. (Not `in_row & keep`: the interpreter turns a block & scalar-bool mask
    # into int64, which its load rejects.)
    live = cols < tl.where(keep, n_cols, 0)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    row_ptr = logits_ptr + _row_offset(row, lead_sizes, lead_strides, N_LEAD)
    x = _load_f32(row_ptr + cols * stride_col, live, BF16_BITS)
    # Subtract before scaling by log2(e): z * log2(e) alone would carry rounding error of the
    # size of |z| u into the exponent, where (z - lse) * log2(e) carries only |z - lse| u.
    p = tl.exp2((x - lse) * 1.4426950408889634)
    # The one-hot term is subtracted before the single rounding of the product.
    g = scale * (p - (cols == t).to(tl.float32))
    # Padded columns and ignored rows are +0.0 whatever the scale (inf * 0 would be NaN).
    g = tl.where(live, g, 0.0)
    _store_rounded(grad_ptr + row * row_len + cols, g, in_row, OUT)


def launch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
           ignore_index: int, n_cols: int, grad: torch.Tensor):
    """logits [..., V] (any strides); targets int64, lse and scale float32, contiguous of the
    leading shape; writes grad (contiguous, the logits' shape and dtype) in place."""
    row_len = logits.shape[-1]
    n_rows = targets.numel()
    if n_rows == 0 or row_len == 0:
        return grad
    if logits.dim() == 1:  # one row without leading dimensions
        logits = logits.unsqueeze(0)
    bf16_bits = logits.dtype == torch.bfloat16
    out = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[logits.dtype]
    if bf16_bits:
        logits = logits.view(torch.int16)  # same strides, the raw bit patterns
    grad_out = grad.view(torch.int16) if bf16_bits else grad
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(row_len)))
    if triton.cdiv(row_len, block) > 65535:  # the grid's second axis
        raise ValueError(f"rows of {row_len} columns are too long for the Triton softmax_grad")
    # The logits' own leading sizes and strides: a [B, T-1, V] slice is read in place (a reshape
    # here would copy it, doubling the backward's peak memory).
    lead_sizes, lead_strides = tuple(logits.shape[:-1]), tuple(logits.stride()[:-1])
    _grad_kernel[(n_rows, triton.cdiv(row_len, block))](
        logits, targets, lse, scale, grad_out, lead_sizes, lead_strides, logits.stride(-1), n_cols,
        row_len, ignore_index, BLOCK=block, N_LEAD=len(lead_sizes), BF16_BITS=bf16_bits, OUT=out,
        num_warps=8 if block >= 2048 else 4)
    return grad
