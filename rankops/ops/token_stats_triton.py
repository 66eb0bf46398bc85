"""Triton kernels for token_stats and per-rank accumulation (GPU; CPU under TRITON_INTERPRET=1).

Each row of logits is split into fixed slices of SLICE_COLS columns; one program streams one
(row, slice) in BLOCK-wide tiles, reading each logit once: it counts values above and equal to
the target logit and keeps an online max and sum of exponentials (one exp2 per element, the
argument pre-scaled by log2(e), and one rescale per tile). A second kernel merges a row's slice
partials in a fixed order (log-add-exp for the sums, integer addition for the counts), writes
rank, ties and logp, and for accumulation adds the token to the per-rank int64 histograms with
integer atomics on exact fixed-point logp, so the histograms are bit-identical run after run.
The slices do not depend on the launch configuration, so neither does any result. Rows are
found from the logits' own leading sizes and strides (any N-d strided view, no reshape copy);
offsets are 64-bit. Nothing here synchronises with the host.

The accumulator's state layout (its rows, fixed-point scale and limit) belongs to the accumulate
op: the caller passes it in (`rows`, `logp_scale`, `logp_limit`) and the kernel takes it as
compile-time constants.
"""
import torch
import triton
import triton.language as tl

from rankops.ops.common import triton_interpreted

SLICE_COLS = 16384   # columns per program: keeps few-row, huge-V inputs spread over the GPU


def slice_config(n_cols: int):
    """(BLOCK, num_warps) of _slice_kernel for rows of n_cols: 8 elements a thread per tile (one
    or two 16-byte loads), SLICE_COLS / BLOCK terms per lane. bench/kernel_census.py compiles
    the kernel with these too."""
    block = min(2048, triton.next_power_of_2(min(n_cols, SLICE_COLS)))
    return block, max(1, min(8, block // 256))


# log2(e) = LOG2E_HI + LOG2E_LO. exp(d) as exp2(d * LOG2E_HI) alone has a one-sided error: the
# fp32 constant is 1.3e-8 (relative) low, so every term exp(d), d <= 0, comes out (1 + 1.3e-8 |d|)
# too large, the sum too, and logp low by ~1.3e-8 times the mean |d| under the softmax (a few
# nats). The low part removes that: d * LOG2E_HI + d * LOG2E_LO leaves only rounding noise.
LOG2E_HI = tl.constexpr(1.44269502162933349609375)  # fp32(log2(e))
LOG2E_LO = tl.constexpr(1.92596298909109e-08)        # log2(e) - LOG2E_HI


@triton.jit
def _load_f32(ptrs, mask, BF16_BITS: tl.constexpr):
    """Loads logits as float32. bf16 arrives as its int16 bit pattern and is upcast by a shift
    into the top half of an fp32 word: exact for every value, subnormals included (the Triton
    interpreter's own bf16 conversion flushes those to zero)."""
    if BF16_BITS:
        raw = tl.load(ptrs, mask=mask, other=-128)  # -128 = 0xff80, bf16 -inf
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)


# What a slice saw, as bits (or-ed over the slice): the end of a row needs them to follow docs/DESIGN.md,
# logsumexp = NaN if any value is NaN, else +inf if any is +inf, else -inf if all are -inf.
SAW_NAN = tl.constexpr(1)
SAW_POS_INF = tl.constexpr(2)
SAW_NEG_INF = tl.constexpr(4)


@triton.jit
def _row_offset(row, lead_sizes, lead_strides, N_LEAD: tl.constexpr):
    """Element offset of flat (row-major) row `row` in logits with N_LEAD strided leading
    dimensions: the index of each dimension is peeled off from the last one. int64 throughout.
    The tuples are indexed by constant expressions written in place: a name assigned in a
    compiled kernel holds a tensor, which cannot index a tuple (the interpreter accepts it)."""
    offset = tl.zeros((), tl.int64)
    for k in tl.static_range(N_LEAD):
        offset += (row % lead_sizes[N_LEAD - 1 - k]) * lead_strides[N_LEAD - 1 - k]
        row = row // lead_sizes[N_LEAD - 1 - k]
    return offset


@triton.jit
def _row_target(logits_ptr, targets_ptr, target_logit_ptr, row, lead_sizes, lead_strides,
                stride_col, n_cols, ignore_index, N_LEAD: tl.constexpr, EXTERNAL: tl.constexpr,
                BF16_BITS: tl.constexpr):
    """A row's start, whether it is kept, and its target logit. With an external target logit
    (EXTERNAL) the index only marks ignored rows and is never read; otherwise a target outside
    [0, n_cols) (only possible with validate=False) reads nothing and comes out as ignored."""
    row_ptr = logits_ptr + _row_offset(row, lead_sizes, lead_strides, N_LEAD)
    t = tl.load(targets_ptr + row)
    if EXTERNAL:
        keep = t != ignore_index
        z_t = tl.load(target_logit_ptr + row)
    else:
        keep = (t != ignore_index) & (t >= 0) & (t < n_cols)
        z_t = _load_f32(row_ptr + tl.where(keep, t, 0) * stride_col, True, BF16_BITS)
    return row_ptr, keep, z_t


FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _exp(d):
    """exp(d) for d <= 0 (or -inf, or NaN) without a one-sided error: tl.exp2 (the hardware's
    MUFU.EX2) errs low on average, which read logp ~3e-8 high on average on an H100 (the bound
    of tests/test_logp_bias.py is 2e-8). 2^t, t = d log2(e) = j + f with j an integer and
    |f| <= 1/2: 2^f by a degree-6 polynomial (relative error under 2e-9, mean ~0) on the FMA
    units, times 2^j built in the exponent bits. Below 2^-126 the term is 0; NaN stays NaN.
    The CUDA kernel's exp_of (csrc/cuda/common.cuh) is the same arithmetic."""
    t = tl.fma(d, LOG2E_HI, d * LOG2E_LO)
    r = t + 12582912.0  # 1.5 * 2^23: rounds t to an integer
    f = t - (r - 12582912.0)
    p = tl.fma(f, 0.00015345810970757157, 0.0013399930903688073)
    p = tl.fma(p, f, 0.009618489071726799)
    p = tl.fma(p, f, 0.05550328642129898)
    p = tl.fma(p, f, 0.24022646248340607)
    p = tl.fma(p, f, 0.6931471824645996)
    p = tl.fma(p, f, 1.0)
    j = r.to(tl.int32, bitcast=True) - 0x4B400000
    y = p * ((j + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(t >= -126.0, y, tl.where(t != t, t, 0.0))


@triton.jit
def _lane_update(x, z_t, m, s, gt, eq, lo, inside, MASKED: tl.constexpr):
    """One tile into the per-lane statistics: counts above and equal to the target, the lowest
    non-NaN value, and the online sum of exp(x - m) against the lane's running max m with ONE
    exp per element: exp(-|x - m|) is the new term when x <= m and the old sum's rescale when
    x > m. NaN never passes x > m (m stays NaN-free) and turns the lane's sum NaN; a second +inf
    does too (inf - inf): the slice's end tells the two apart. A masked lane holds -inf (adds
    exp(-inf) = 0, counts above nothing) and is kept out of eq and lo by `inside`."""
    if MASKED:  # a masked lane is -inf whatever the load's `other` gave
        x = tl.where(inside, x, float("-inf"))
        eq += (inside & (x == z_t)).to(tl.int32)
        lo = tl.where(inside & (x < lo), x, lo)
    else:
        eq += (x == z_t).to(tl.int32)
        lo = tl.where(x < lo, x, lo)
    gt += (x > z_t).to(tl.int32)
    a = -tl.abs(x - m)  # subtract before scaling by log2(e): x * log2(e) alone overflows near FLT_MAX
    e = _exp(a)
    up = x > m
    s = tl.where(up, s * e + 1.0, s + e)
    m = tl.where(up, x, m)
    return m, s, gt, eq, lo


@triton.jit
def _slice_kernel(logits_ptr, targets_ptr, target_logit_ptr, lead_sizes, lead_strides, stride_col,
                  n_cols, ignore_index, part_max_ptr, part_sum_ptr, part_gt_ptr, part_eq_ptr,
                  part_bad_ptr, n_slices, SLICE: tl.constexpr, BLOCK: tl.constexpr,
                  N_LEAD: tl.constexpr, EXTERNAL: tl.constexpr, BF16_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    # The target logit first: every compare of the stream is against it.
    row_ptr, keep, z_t = _row_target(logits_ptr, targets_ptr, target_logit_ptr, row, lead_sizes,
                                     lead_strides, stride_col, n_cols, ignore_index, N_LEAD,
                                     EXTERNAL, BF16_BITS)
    begin = sl * SLICE
    end = tl.minimum(begin + SLICE, n_cols)
    end = tl.where(keep, end, begin)  # an ignored row reads nothing
    cols = tl.arange(0, BLOCK)
    # Per-lane statistics, reduced once at the slice's end (not once per tile). Each lane's
    # first reference is the target logit when it is this row's own and finite: every term is
    # then relative to a value of the row, and -inf adds exp(-inf) = 0, never inf - inf.
    # Otherwise the lowest finite float, which the first value above it replaces (an external
    # target may lie far above this shard, whose terms must not underflow against it).
    if EXTERNAL:
        ref0 = -FLT_MAX
    else:
        ref0 = tl.where(tl.abs(z_t) <= FLT_MAX, z_t, -FLT_MAX)
    m = tl.zeros([BLOCK], tl.float32) + ref0
    s = tl.zeros([BLOCK], tl.float32)  # SLICE / BLOCK terms per lane: no fp32 drift to speak of
    gt = tl.zeros([BLOCK], tl.int32)
    eq = tl.zeros([BLOCK], tl.int32)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    n_full = (end - begin) // BLOCK
    tail = begin + n_full * BLOCK
    # Full tiles unmasked, the next one loaded before the current one is summed (two tiles in
    # flight per program); then the masked tail.
    if n_full > 0:
        x = _load_f32(row_ptr + (begin + cols) * stride_col, True, BF16_BITS)
        for start in range(begin + BLOCK, tail, BLOCK):
            x_next = _load_f32(row_ptr + (start + cols) * stride_col, True, BF16_BITS)
            m, s, gt, eq, lo = _lane_update(x, z_t, m, s, gt, eq, lo, True, False)
            x = x_next
        m, s, gt, eq, lo = _lane_update(x, z_t, m, s, gt, eq, lo, True, False)
    if tail < end:
        c = tail + cols
        inside = c < end
        x = _load_f32(row_ptr + c * stride_col, inside, BF16_BITS)
        m, s, gt, eq, lo = _lane_update(x, z_t, m, s, gt, eq, lo, inside, True)
    # The slice's end: the lanes' sums rescaled to the slice's max, summed in fp64 (a fixed
    # tree: bit-identical run after run).
    m_all = tl.max(m, axis=0)
    d = m - m_all
    w = _exp(d)
    total = tl.sum(s.to(tl.float64) * w.to(tl.float64), axis=0)
    lane_nan = tl.max((s != s).to(tl.int32), axis=0)
    pos_inf = m_all == float("inf")
    bad = tl.where(pos_inf, SAW_POS_INF, 0) | tl.where(tl.min(lo, axis=0) == float("-inf"), SAW_NEG_INF, 0)
    bad = bad | tl.where((lane_nan != 0) & (m_all != float("inf")), SAW_NAN, 0)
    if pos_inf & (lane_nan != 0):
        # Rare: a NaN sum beside a +inf may come from inf - inf alone; only the values tell.
        nan_seen = tl.zeros((), tl.int32)
        for start in range(begin, end, BLOCK):
            c = start + cols
            xs = _load_f32(row_ptr + c * stride_col, c < end, BF16_BITS)
            nan_seen = nan_seen | tl.max((xs != xs).to(tl.int32), axis=0)
        bad = bad | tl.where(nan_seen != 0, SAW_NAN, 0)
    out = row * n_slices + sl
    tl.store(part_max_ptr + out, m_all)
    tl.store(part_sum_ptr + out, total)
    tl.store(part_gt_ptr + out, tl.sum(gt, axis=0).to(tl.int64))
    tl.store(part_eq_ptr + out, tl.sum(eq, axis=0).to(tl.int64))
    tl.store(part_bad_ptr + out, bad)


@triton.jit
def _finish_kernel(logits_ptr, targets_ptr, target_logit_ptr, lead_sizes, lead_strides, stride_col,
                   n_cols, ignore_index, part_max_ptr, part_sum_ptr, part_gt_ptr, part_eq_ptr,
                   part_bad_ptr, n_slices, rank_ptr, ties_ptr, logp_ptr, bad_ptr, stats_ptr,
                   hist_len, N_LEAD: tl.constexpr, EXTERNAL: tl.constexpr, BF16_BITS: tl.constexpr,
                   ACCUMULATE: tl.constexpr, ROW_COUNT: tl.constexpr, ROW_SUM_HI: tl.constexpr,
                   ROW_SUM_LO: tl.constexpr, ROW_COUNT_PESS: tl.constexpr,
                   ROW_SUM_HI_PESS: tl.constexpr, ROW_SUM_LO_PESS: tl.constexpr,
                   LOGP_SCALE: tl.constexpr, LOGP_LIMIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _, keep, z_t = _row_target(logits_ptr, targets_ptr, target_logit_ptr, row, lead_sizes,
                               lead_strides, stride_col, n_cols, ignore_index, N_LEAD, EXTERNAL,
                               BF16_BITS)
    # The merge and the final combination in fp64, one row per program: an fp32 m + log(s) and
    # z_t - lse would each round at the scale of the logits (|m| ~ 20 gives steps of 2e-6).
    m = tl.full((), float("-inf"), tl.float64)
    s = tl.zeros((), tl.float64)
    gt = tl.zeros((), tl.int64)
    eq = tl.zeros((), tl.int64)
    bad = tl.zeros((), tl.int32)
    for sl in range(0, n_slices):  # fixed order: the result never depends on scheduling
        i = row * n_slices + sl
        pm = tl.load(part_max_ptr + i).to(tl.float64)
        m_new = tl.maximum(m, pm)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf
        s = s * tl.exp(m - shift) + tl.load(part_sum_ptr + i) * tl.exp(pm - shift)
        m = m_new
        gt += tl.load(part_gt_ptr + i)
        eq += tl.load(part_eq_ptr + i)
        bad = bad | tl.load(part_bad_ptr + i)
    rank = gt
    if EXTERNAL:
        ties = eq  # the target may live on another shard: every equal value counts
    else:
        ties = eq - (z_t == z_t).to(tl.int64)  # the target is not its own tie
    # The online max and sum say nothing reliable once a NaN or +inf entered them (NaN - x, and
    # inf - inf); the bits do. All -inf: m = -inf, s = 0, so m + log(s) is -inf already.
    lse = m + tl.log(tl.where(keep, s, 1.0))  # ignored rows summed nothing
    lse = tl.where((bad & SAW_POS_INF) != 0, float("inf"), lse)
    lse = tl.where((bad & SAW_NAN) != 0, float("nan"), lse)
    logp = (z_t.to(tl.float64) - lse).to(tl.float32)
    tl.store(rank_ptr + row, tl.where(keep, rank, -1))
    tl.store(ties_ptr + row, tl.where(keep, ties, 0))
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(bad_ptr + row, tl.where(keep & (bad != 0), 1, 0))
    if ACCUMULATE:
        # Exact fixed point with the caller's scale: q = floor(logp * LOGP_SCALE + 1/2), added
        # as two words, hi = q >> 32 (arithmetic) and lo = q & (2^32 - 1); the caller moves lo's
        # carry afterwards. Only logp gates the add (a -inf logit elsewhere in the row is fine;
        # NaN fails the comparison); the caller decides from `bad` whether non-finite logits
        # fail the call.
        ok = keep & (tl.abs(logp) < LOGP_LIMIT)
        q = tl.floor(logp.to(tl.float64) * LOGP_SCALE + 0.5).to(tl.int64)
        q = tl.where(ok, q, 0)
        hi = q >> 32
        lo = q & 0xFFFFFFFF
        kp = rank + ties
        one = tl.full((), 1, tl.int64)
        tl.atomic_add(stats_ptr + ROW_COUNT * hist_len + rank, one, mask=ok)
        tl.atomic_add(stats_ptr + ROW_SUM_HI * hist_len + rank, hi, mask=ok)
        tl.atomic_add(stats_ptr + ROW_SUM_LO * hist_len + rank, lo, mask=ok)
        tl.atomic_add(stats_ptr + ROW_COUNT_PESS * hist_len + kp, one, mask=ok)
        tl.atomic_add(stats_ptr + ROW_SUM_HI_PESS * hist_len + kp, hi, mask=ok)
        tl.atomic_add(stats_ptr + ROW_SUM_LO_PESS * hist_len + kp, lo, mask=ok)


def launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int, *,
           target_logit=None, stats=None, rows=None, logp_scale=None, logp_limit=None):
    """logits [..., V] (any strides), targets int64 contiguous of the leading shape.

    target_logit: optional float32 contiguous of the leading shape, the external target-logit
    mode (rows kept iff target != ignore_index, the index never read, ties raw).
    stats: optional [6, V] int64 state; every kept token with |logp| < logp_limit is added at
    the rows `rows` = (count, sum_hi, sum_lo, count_pess, sum_hi_pess, sum_lo_pess) with fixed
    point scale logp_scale (all three required with stats; not with target_logit).
    Returns rank, ties, logp and int32 non-finite flags, all of the leading shape."""
    if stats is not None:
        if rows is None or logp_scale is None or logp_limit is None:
            raise TypeError("launch(stats=...) needs the state's layout: rows, logp_scale and logp_limit")
        if len(rows) != 6:
            raise ValueError(f"rows must name the state's 6 rows, got {rows!r}")
        if target_logit is not None:
            raise ValueError("stats cannot be combined with target_logit: per-shard ranks are partial")
    device = logits.device
    lead_shape = targets.shape
    rank = torch.empty(lead_shape, dtype=torch.int64, device=device)
    ties = torch.empty_like(rank)
    logp = torch.empty(lead_shape, dtype=torch.float32, device=device)
    bad = torch.empty(lead_shape, dtype=torch.int32, device=device)
    n_rows = targets.numel()
    if n_rows == 0:
        return rank, ties, logp, bad
    if logits.dim() == 1:  # one row without leading dimensions
        logits = logits.unsqueeze(0)
    # The interpreter reads bf16 as raw bits (its own conversion flushes subnormals); compiled
    # kernels load bf16 natively, an exact upcast.
    bf16_bits = logits.dtype == torch.bfloat16 and triton_interpreted()
    if bf16_bits:
        logits = logits.view(torch.int16)  # same strides, the raw bit patterns
    geometry = (tuple(logits.shape[:-1]), tuple(logits.stride()[:-1]), logits.stride(-1))
    external = target_logit is not None
    n_slices = triton.cdiv(n_cols, SLICE_COLS)
    block, warps = slice_config(n_cols)
    part_max = torch.empty(n_rows * n_slices, dtype=torch.float32, device=device)
    part_sum = torch.empty(n_rows * n_slices, dtype=torch.float64, device=device)
    part_gt = torch.empty(n_rows * n_slices, dtype=torch.int64, device=device)
    part_eq = torch.empty_like(part_gt)
    part_bad = torch.empty(n_rows * n_slices, dtype=torch.int32, device=device)
    parts = (part_max, part_sum, part_gt, part_eq, part_bad, n_slices)
    # Unused pointers get a valid placeholder tensor; constexpr flags keep them unread.
    target_logit_arg = target_logit if external else logp
    _slice_kernel[(n_rows, n_slices)](
        logits, targets, target_logit_arg, *geometry, n_cols, ignore_index, *parts,
        SLICE=SLICE_COLS, BLOCK=block, N_LEAD=len(geometry[0]), EXTERNAL=external,
        BF16_BITS=bf16_bits, num_warps=warps)
    accumulate = stats is not None
    layout = dict(zip(("ROW_COUNT", "ROW_SUM_HI", "ROW_SUM_LO", "ROW_COUNT_PESS", "ROW_SUM_HI_PESS",
                       "ROW_SUM_LO_PESS"), rows if accumulate else (0,) * 6))
    _finish_kernel[(n_rows,)](
        logits, targets, target_logit_arg, *geometry, n_cols, ignore_index, *parts,
        rank, ties, logp, bad, stats if accumulate else rank, stats.shape[1] if accumulate else 0,
        N_LEAD=len(geometry[0]), EXTERNAL=external, BF16_BITS=bf16_bits, ACCUMULATE=accumulate,
        LOGP_SCALE=float(logp_scale) if accumulate else 0.0,
        LOGP_LIMIT=float(logp_limit) if accumulate else 0.0, **layout, num_warps=1)
    return rank, ties, logp, bad
