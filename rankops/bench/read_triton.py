"""The read_triton baseline of rankops.bench: a Triton row-max, one read of the logits, spread
over the GPU as the kernels it is compared with are. Imported only when that baseline runs, so
that `rankops` commands do not pay Triton's import."""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_max_kernel(x_ptr, out_ptr, stride_row, n_cols, chunk, n_chunks, BLOCK: tl.constexpr):
    # One program reads one chunk of one row: the pure-read baseline has the same freedom
    # to spread few rows over the GPU as the kernels it is compared with.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    begin = c * chunk
    end = tl.minimum(begin + chunk, n_cols)
    acc = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + cols, mask=cols < end, other=float("-inf"))
        acc = tl.maximum(acc, x.to(tl.float32))
    tl.store(out_ptr + row * n_chunks + c, tl.max(acc, axis=0))


def triton_row_max(logits):
    """Row maxima [N] fp32 of contiguous-row logits [N, V]: one read, split into >= 1024 programs
    where the rows allow (chunks of 16384 columns, halved down to one block)."""
    n_rows, n_cols = logits.shape
    block = min(4096, triton.next_power_of_2(n_cols))
    chunk = max(16384, block)
    while chunk > block and n_rows * triton.cdiv(n_cols, chunk) < 1024:
        chunk //= 2
    n_chunks = triton.cdiv(n_cols, chunk)
    part = torch.empty(n_rows, n_chunks, dtype=torch.float32, device=logits.device)
    _row_max_kernel[(n_rows, n_chunks)](logits, part, logits.stride(0), n_cols, chunk, n_chunks,
                                        BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return part[:, 0] if n_chunks == 1 else part.amax(dim=1)
