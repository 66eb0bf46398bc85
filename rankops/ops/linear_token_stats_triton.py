"""Triton kernel for linear_token_stats: token_stats of hidden @ weight.T + bias, fused, the
[N, V] logits never written (GPU; CPU under TRITON_INTERPRET=1).

One program owns BLOCK_M rows and one split of the vocabulary (`split_cols` columns, a function
of the call only, never of the device) and walks it in [BLOCK_M, BLOCK_N] logit tiles, each a
K-loop of tl.dot with fp32 accumulation (tensor cores for 16-bit inputs; fp32 inputs with
input_precision="ieee", so every logit is a true fp32 dot product, not TF32). A tile is folded
into per-row partials and dropped; nothing of size N * V is ever stored.

The rank needs the target's logit before any comparison, and the target's logit must be the
very value this path computes for its column. So the same compiled kernel runs twice over the
same tiles, told apart by a runtime argument `count_pass` (kept out of Triton's specialisation,
so both launches execute one binary, and a tile's instructions, inputs and accumulation order
are identical in both: its values are bit-identical):
  pass 0: online max / sum of exp per row (one exp2 per logit, the tiles' sums added in fp64),
          non-finite flags, and z_t taken from the tile where col == target (one program
          holds it; it writes z_t[row]);
  pass 1: counts of logits > z_t and == z_t per row.
A third small kernel merges each row's split partials in split order (log-add-exp for the sums,
integer addition for the counts) and finishes the row exactly as token_stats' Triton kernel
does (in fp64). Extra memory: z_t and 32 bytes of partials per (row, split), O(N * V / split_cols).

Logits are rounded to the inputs' dtype (one rounding of the fp32 accumulator plus bias, as
F.linear's epilogue does), so bf16 inputs give bf16 logits and bf16 ties, like the other
backends. Row and column offsets are int64 (N * D and V * D pass 2^31).

Under the interpreter, tl.dot on bf16 operands and the fp32 -> bf16 cast are not faithful (the
dot multiplies the raw bit patterns, the cast truncates); there the 16-bit operands are upcast
to fp32 first (exact: a product of two 16-bit floats is exact in fp32, so the dot still sums the
same exact products in fp32) and the bf16 rounding is done on the bits (round to nearest even),
which is also what the GPU does.
"""
import torch
import triton
import triton.language as tl

from rankops.ops.common import triton_interpreted
# _exp: token_stats_triton's exp without the one-sided error of the hardware's exp2 (docs/DESIGN.md,
# "Accuracy of logp"). SAW_*: what a split saw, as bits, the same flags as token_stats_triton's
# slices: the finish needs them to follow docs/DESIGN.md, logsumexp = NaN if any value is NaN,
# else +inf if any is +inf.
from rankops.ops.token_stats_triton import SAW_NAN, SAW_NEG_INF, SAW_POS_INF, _exp

# tl.sum and tl.max are these reductions (for fp32 and int32 inputs); called directly, the
# interpreter runs them as numpy sums instead of re-entering a jit function per call.
_sum_combine = tl.standard._sum_combine
_max_combine = tl.standard._elementwise_max

SPLIT_COLS = 16384   # default vocabulary columns per program (the public block_size)
BLOCK_N = 128        # split_cols must be a multiple: tiles never straddle two programs

# (BLOCK_M, BLOCK_K, num_warps, num_stages) per input width. 128 x 128 tiles of 16-bit inputs
# read each weight tile once per 128 rows; fp32 "ieee" dots run on FMA units, so a smaller
# K step keeps their operands in registers. Not tuned on hardware yet.
TILES = {2: (128, 64, 8, 3), 4: (64, 32, 4, 2)}


@triton.jit(do_not_specialize=["count_pass"])
def _tiles_kernel(hidden_ptr, stride_hm, stride_hk, weight_ptr, stride_wn, stride_wk, bias_ptr,
                  targets_ptr, n_rows, n_cols, n_dim, split_cols, n_splits, target_logit_ptr,
                  part_max_ptr, part_sum_ptr, part_bad_ptr, part_gt_ptr, part_eq_ptr, count_pass,
                  HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
                  BF16_BITS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    t = tl.load(targets_ptr + rows, mask=row_in, other=-1)
    # pass 1 compares against pass 0's z_t (NaN where no tile held the target: ignored rows,
    # which the finish discards anyway); pass 0 reads the NaN and uses nothing of it.
    z_t = tl.load(target_logit_ptr + rows, mask=row_in, other=0.0)
    col_begin = split * split_cols
    col_end = tl.minimum(col_begin + split_cols, n_cols)
    ks0 = tl.arange(0, BLOCK_K)
    h_rows = hidden_ptr + rows[:, None] * stride_hm        # [BLOCK_M, 1] pointers, int64 offsets
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    # Each tile's sum is added to an fp64 running sum: in fp32 the later tiles' small sums
    # would lose their low bits to the large running value, always downwards (a bias).
    s = tl.zeros((BLOCK_M,), tl.float64)
    bad = tl.zeros((BLOCK_M,), tl.int32)
    z_t_found = tl.full((BLOCK_M,), -0.0, tl.float32)     # -0.0: see the sum below
    gt = tl.zeros((BLOCK_M,), tl.int32)
    eq = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_in = cols < col_end
        w_cols = weight_ptr + cols[None, :] * stride_wn    # [1, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # The tile: the same loads and dots in the same order in both passes. Masked-out
        # K entries load 0 on both sides and add exact zeros.
        for k0 in range(0, n_dim, BLOCK_K):
            ks = k0 + ks0
            k_in = ks < n_dim
            a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_in[:, None] & k_in[None, :], other=0)
            b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_in[:, None] & col_in[None, :], other=0)
            if UPCAST:  # the interpreter only (module docstring): exact upcasts
                if BF16_BITS:  # bf16 as int16 bits, shifted into the top half of an fp32 word
                    a = (a.to(tl.int32) << 16).to(tl.float32, bitcast=True)
                    b = (b.to(tl.int32) << 16).to(tl.float32, bitcast=True)
                else:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_in, other=0)
            if BF16_BITS:
                bias = (bias.to(tl.int32) << 16).to(tl.float32, bitcast=True)
            acc += bias.to(tl.float32)[None, :]
        # One rounding of the fp32 logit to the inputs' dtype, to nearest even, back to fp32
        # (exact). (Helpers are inlined: the interpreter re-patches the language per call.)
        if ROUND == 1:  # bf16, on the bits
            bits = acc.to(tl.int32, bitcast=True)
            # Add 0x7fff plus the lowest kept bit, drop the low half: round half to even.
            # Finite values past bf16's largest carry into the exponent and become inf, as
            # they should; NaN is kept as it is (its low bits could carry it into inf).
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            z = tl.where(acc != acc, acc, rounded)
        elif ROUND == 2:  # fp16
            z = acc.to(tl.float16).to(tl.float32)
        else:
            z = acc
        valid = row_in[:, None] & col_in[None, :]
        x = tl.where(valid, z, float("-inf"))              # [BLOCK_M, BLOCK_N] logits
        if count_pass == 0:
            # Non-finite flags in one reduction: per row, the tile's counts of NaN, +inf and
            # -inf (each at most BLOCK_N < 256) packed into bytes of one int32, then made bits.
            kinds = (valid & (x != x)).to(tl.int32) + ((valid & (x == float("inf"))).to(tl.int32) << 8) + \
                ((valid & (x == float("-inf"))).to(tl.int32) << 16)
            kinds = tl.reduce(kinds, 1, _sum_combine)
            bad = bad | tl.where((kinds & 0xFF) != 0, SAW_NAN, 0) | \
                tl.where(((kinds >> 8) & 0xFF) != 0, SAW_POS_INF, 0) | \
                tl.where((kinds >> 16) != 0, SAW_NEG_INF, 0)
            m_new = tl.maximum(m, tl.reduce(x, 1, _max_combine))
            # An all -inf prefix leaves m_new = -inf: shift by 0 so that no inf - inf appears.
            # Subtract before scaling by log2(e): x * log2(e) alone overflows near FLT_MAX.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = x - shift[:, None]
            d_old = m - shift
            # The tile's terms summed in fp64: an fp32 sum loses the small terms after the
            # large ones, always downwards (+2.5e-8 mean logp error on test_logp_bias's sample
            # once the exp itself was unbiased; docs/DESIGN.md, "Accuracy of logp").
            tile = tl.reduce(_exp(d).to(tl.float64), 1, _sum_combine)
            s = s * _exp(d_old).to(tl.float64) + tile
            m = m_new
            # z_t from this very tile: at most one column of a row matches in this program,
            # every other addend is -0.0, the identity of IEEE addition (x + -0.0 = x for
            # every x, +0.0 and NaN included), so the sum is that logit, bit for bit, in any
            # order of summation.
            hit = valid & (cols[None, :] == t[:, None])
            z_t_found += tl.reduce(tl.where(hit, x, -0.0), 1, _sum_combine)
        else:
            # Both counts in one reduction: each at most BLOCK_N < 2^15 per row and tile.
            counts = (valid & (x > z_t[:, None])).to(tl.int32) + ((valid & (x == z_t[:, None])).to(tl.int32) << 16)
            counts = tl.reduce(counts, 1, _sum_combine)
            gt += counts & 0xFFFF
            eq += counts >> 16
    out = rows * n_splits + split
    if count_pass == 0:
        tl.store(part_max_ptr + out, m, mask=row_in)
        tl.store(part_sum_ptr + out, s, mask=row_in)
        tl.store(part_bad_ptr + out, bad, mask=row_in)
        # Exactly one program of a kept row holds its target's column: no race.
        found = row_in & (t >= col_begin) & (t < col_end)
        tl.store(target_logit_ptr + rows, z_t_found, mask=found)
    else:
        tl.store(part_gt_ptr + out, gt.to(tl.int64), mask=row_in)
        tl.store(part_eq_ptr + out, eq.to(tl.int64), mask=row_in)


@triton.jit
def _finish_kernel(targets_ptr, target_logit_ptr, part_max_ptr, part_sum_ptr, part_bad_ptr,
                   part_gt_ptr, part_eq_ptr, n_rows, n_cols, n_splits, ignore_index, rank_ptr,
                   ties_ptr, logp_ptr, bad_ptr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_rows
    t = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    keep = row_in & (t != ignore_index) & (t >= 0) & (t < n_cols)
    z_t = tl.load(target_logit_ptr + rows, mask=keep, other=0.0)
    # The merge and the final combination in fp64: in fp32, m + log(s) and z_t - lse would each
    # round at the scale of the logits (as in token_stats_triton's finish).
    m = tl.full((BLOCK_R,), float("-inf"), tl.float64)
    s = tl.zeros((BLOCK_R,), tl.float64)
    gt = tl.zeros((BLOCK_R,), tl.int64)
    eq = tl.zeros((BLOCK_R,), tl.int64)
    bad = tl.zeros((BLOCK_R,), tl.int32)
    for sl in range(0, n_splits):  # fixed order: the result never depends on scheduling
        i = rows * n_splits + sl
        pm = tl.load(part_max_ptr + i, mask=keep, other=float("-inf")).to(tl.float64)
        m_new = tl.maximum(m, pm)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf
        s = s * tl.exp(m - shift) + tl.load(part_sum_ptr + i, mask=keep, other=0.0) * tl.exp(pm - shift)
        m = m_new
        gt += tl.load(part_gt_ptr + i, mask=keep, other=0)
        eq += tl.load(part_eq_ptr + i, mask=keep, other=0)
        bad = bad | tl.load(part_bad_ptr + i, mask=keep, other=0)
    ties = eq - (z_t == z_t).to(tl.int64)  # the target is not its own tie (a NaN never equals)
    # The online max and sum mean nothing once a NaN or +inf entered them; the flags decide
    # (docs/DESIGN.md): NaN if any NaN, else +inf if any +inf; all -inf gives m + log(0) = -inf.
    lse = m + tl.log(tl.where(keep, s, 1.0))
    lse = tl.where((bad & SAW_POS_INF) != 0, float("inf"), lse)
    lse = tl.where((bad & SAW_NAN) != 0, float("nan"), lse)
    logp = (z_t.to(tl.float64) - lse).to(tl.float32)
    tl.store(rank_ptr + rows, tl.where(keep, gt, -1), mask=row_in)
    tl.store(ties_ptr + rows, tl.where(keep, ties, 0), mask=row_in)
    tl.store(logp_ptr + rows, tl.where(keep, logp, 0.0), mask=row_in)
    tl.store(bad_ptr + rows, tl.where(keep & (bad != 0), 1, 0), mask=row_in)


def launch(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, ignore_index: int,
           n_cols: int, split_cols: int = SPLIT_COLS):
    """hidden [N, D] (any strides), weight [V, D] (any strides, V >= n_cols), bias [V] or None,
    targets [N] int64 contiguous. split_cols: vocabulary columns per program, a multiple of
    BLOCK_N. Returns flat rank, ties, logp [N] and int32 non-finite flags [N] (kept rows only)."""
    if split_cols % BLOCK_N:
        raise ValueError(f"split_cols must be a multiple of {BLOCK_N}, got {split_cols}")
    device = hidden.device
    n_rows, n_dim = hidden.shape
    rank = torch.empty(n_rows, dtype=torch.int64, device=device)
    ties = torch.empty_like(rank)
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    bad = torch.empty(n_rows, dtype=torch.int32, device=device)
    n_splits = triton.cdiv(n_cols, split_cols)
    if n_splits > 65535:  # a CUDA grid's second dimension
        raise ValueError(f"block_size={split_cols} cuts {n_cols} columns into {n_splits} programs "
                         "per row block, over the 65535 a launch allows; use a larger block_size")
    target_logit = torch.full((n_rows,), float("nan"), dtype=torch.float32, device=device)
    part_max = torch.empty(n_rows * n_splits, dtype=torch.float32, device=device)
    part_sum = torch.empty(n_rows * n_splits, dtype=torch.float64, device=device)
    part_bad = torch.empty(n_rows * n_splits, dtype=torch.int32, device=device)
    part_gt = torch.empty(n_rows * n_splits, dtype=torch.int64, device=device)
    part_eq = torch.empty_like(part_gt)
    dtype = hidden.dtype
    interpreted = triton_interpreted()
    bf16_bits = dtype == torch.bfloat16 and interpreted
    if bf16_bits:  # the interpreter reads bf16 as raw bits; see the module's docstring
        hidden, weight = hidden.view(torch.int16), weight.view(torch.int16)
        bias = None if bias is None else bias.view(torch.int16)
    block_m, block_k, num_warps, num_stages = TILES[dtype.itemsize]
    block_n = BLOCK_N
    if interpreted:
        # The interpreter's cost is per operation, not per element: fewer, larger tiles. A
        # tile's shape can change the rounding of logits and sums, never the rule that both
        # passes see the same tiles.
        block_m = 128
        block_n = next(w for w in (1024, 512, 256, BLOCK_N) if split_cols % w == 0)
    upcast = interpreted and dtype != torch.float32
    precision = "ieee" if (dtype == torch.float32 or upcast) else None
    round_mode = {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)
    args = (hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else logp, targets, n_rows, n_cols, n_dim, split_cols, n_splits,
            target_logit, part_max, part_sum, part_bad, part_gt, part_eq)
    meta = dict(HAS_BIAS=bias is not None, ROUND=round_mode, UPCAST=upcast, BF16_BITS=bf16_bits,
                INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=num_warps, num_stages=num_stages)
    grid = (triton.cdiv(n_rows, block_m), n_splits)
    for count_pass in (0, 1):  # one binary, two launches (see the module's docstring)
        _tiles_kernel[grid](*args, count_pass, **meta)
    block_r = 128
    _finish_kernel[(triton.cdiv(n_rows, block_r),)](
        targets, target_logit, part_max, part_sum, part_bad, part_gt, part_eq, n_rows, n_cols,
        n_splits, ignore_index, rank, ties, logp, bad, BLOCK_R=block_r, num_warps=4)
    return rank, ties, logp, bad
