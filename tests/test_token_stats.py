"""token_stats: every backend against the torch reference and against float64 truth.

Truth is computed here in numpy float64 from the definitions of docs/DESIGN.md, "Definitions":
rank = #{v : z_v > z_t}, ties = #{v != t : z_v == z_t}, logp = z_t - logsumexp(z). Upcasting
bf16/fp16/fp32 to float64 is exact, so the truth's order and ties are those of the raw dtype.
Ranks and ties are integers and compared exactly.

logp tolerances, in units of u (2^-24 for float32 results, 2^-53 for float64), with the growth
allowance G(V) = 4 + 2 log2(V): a vectorised or pairwise fp32 sum of V terms has relative error
growing like log2(V) u, which the log turns into absolute error; we allow twice that, plus 4 u for
exp's 1-2 ulp and the final rounding.
(A) against the same-dtype torch reference: err <= ref_err + G(V) u max(1, |logp|). The kernel
    must be no worse than torch's own logsumexp beyond that allowance. Measured on 2000 rows with
    top-1 targets (the hardest case: |logp| < 1): the avx512 kernel stays within 0.4 of it; a
    sequential fp32 sum over a 2048-logit chunk (error growing like V, not log V) exceeds it.
(B) against truth: err <= G(V) u max(1, |logp|, |lse|). An fp32 pipeline may also round lse
    (u |lse|) before subtracting; this holds the reference itself (measured: within 0.5).
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rankops
from rankops.ops.common import BACKENDS

from conftest import HOST_BACKENDS

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS_2D = ("contiguous", "col_slice", "every_other", "vocab_major")
needs_cpu_kernel = pytest.mark.skipif("cpu" not in rankops.available_backends(),
                                      reason="the C++ CPU kernel is not built")


# ---------------------------------------------------------------------------------------------
# Inputs and truth
# ---------------------------------------------------------------------------------------------

def make_logits(lead, n_vocab, dtype, layout="contiguous", *, seed=0, scale=3.0, device="cpu"):
    """Random logits [*lead, n_vocab] whose storage has the named layout."""
    g = torch.Generator().manual_seed(seed)

    def storage(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    if layout == "contiguous":
        return storage(*lead, n_vocab)
    if layout == "col_slice":      # rows longer than V and a storage offset: big[..., 1:-1]
        return storage(*lead, n_vocab + 2)[..., 1:-1]
    if layout == "every_other":    # column stride 2: big[..., ::2]
        return storage(*lead, 2 * n_vocab)[..., ::2]
    if layout == "vocab_major":    # big.t(): column stride = number of rows, rows adjacent
        return storage(n_vocab, *lead).movedim(0, -1)
    if layout == "lead_permuted":  # leading dims stored in reverse order (non-contiguous permute)
        n = len(lead)
        return storage(*reversed(lead), n_vocab).permute(*reversed(range(n)), n)
    raise ValueError(layout)


def make_targets(logits, n_cols=None, *, seed=1, ignore_frac=0.25, ignore_index=-100):
    """Random targets in [0, n_cols), some ignored; the first rows hit argmax, 0 and n_cols - 1."""
    n_cols = n_cols or logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, n_cols, lead, generator=g)
    targets[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    flat = targets.view(-1)
    firsts = [int(logits.reshape(-1, logits.shape[-1])[0, :n_cols].float().argmax()), 0, n_cols - 1]
    flat[:len(firsts)] = torch.tensor(firsts[:flat.numel()])
    return targets.to(logits.device)


def truth(logits, targets, ignore_index=-100, vocab_size=None):
    """float64 rank, ties, logp and lse per row (flattened), from the definitions."""
    z = logits.detach().cpu().double().numpy()
    z = z.reshape(-1, z.shape[-1])[:, :vocab_size]
    t = targets.cpu().numpy().reshape(-1).astype(np.int64)
    keep = t != ignore_index
    z_t = z[np.arange(len(t)), np.where(keep, t, 0)]
    rank = (z > z_t[:, None]).sum(1)
    ties = (z == z_t[:, None]).sum(1) - (z_t == z_t)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        z_max = z.max(1)
        lse = z_max + np.log(np.exp(z - z_max[:, None]).sum(1))
        logp = z_t - lse
    return (np.where(keep, rank, -1), np.where(keep, ties, 0), np.where(keep, logp, 0.0),
            np.where(keep, lse, 0.0))


def growth(n_cols):
    """G(V) of the module docstring."""
    return 4 + 2 * math.log2(n_cols)


def assert_logp_close(got, want, lse, n_cols, ref=None):
    """Bounds (A) and (B) of the module docstring; got/ref are tensors, want/lse float64 arrays."""
    unit = 2.0 ** -53 if got.dtype == torch.float64 else 2.0 ** -24
    got = got.detach().cpu().double().numpy().reshape(-1)
    # Where the truth rounds to +-inf in the output dtype (a -6.8e38 logp in float32), the
    # correctly rounded answer is that infinity.
    with np.errstate(over="ignore"):
        want_rounded = want.astype(np.float32) if unit == 2.0 ** -24 else want
    inf = ~np.isfinite(want_rounded)
    assert np.array_equal(got[inf], want_rounded[inf]), (got[inf], want_rounded[inf])
    got, want, lse = got[~inf], want[~inf], lse[~inf]
    allowed = growth(n_cols)
    scale = np.maximum(1.0, np.abs(want))
    err = np.abs(got - want)
    bound_b = unit * allowed * np.maximum(scale, np.abs(lse))
    assert (err <= bound_b).all(), (
        f"logp vs float64 truth: worst {np.max(err / bound_b):.2f} x the bound, "
        f"max error {err.max() / unit:.1f} u at logp={want[np.argmax(err / bound_b)]:.4f}")
    if ref is not None:
        ref_err = np.abs(ref.detach().cpu().double().numpy().reshape(-1)[~inf] - want)
        excess = (err - ref_err) / (unit * scale)
        worst = np.argmax(excess)
        assert (excess <= allowed).all(), (
            f"logp worse than the torch reference by {excess[worst]:.1f} u max(1, |logp|), "
            f"allowed {allowed:.1f} (error {err[worst] / unit:.1f} u, reference "
            f"{ref_err[worst] / unit:.1f} u, logp={want[worst]:.4f})")


def expect_correct(backend, logits, targets, *, ignore_index=-100, vocab_size=None,
                   check_logp=True, **kwargs):
    """Runs backend, compares it with the torch reference and with float64 truth; returns it."""
    got = rankops.token_stats(logits, targets, ignore_index=ignore_index, vocab_size=vocab_size,
                              backend=backend, **kwargs)
    ref = rankops.token_stats(logits.cpu(), targets.cpu(), ignore_index=ignore_index,
                              vocab_size=vocab_size, backend="torch", **kwargs)
    shape = tuple(targets.shape)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert (got.rank.dtype, got.ties.dtype, got.logp.dtype) == (torch.int64, torch.int64, out_dtype)
    assert tuple(got.rank.shape) == tuple(got.ties.shape) == tuple(got.logp.shape) == shape
    assert torch.equal(got.rank.cpu(), ref.rank) and torch.equal(got.ties.cpu(), ref.ties)
    rank, ties, logp, lse = truth(logits, targets, ignore_index, vocab_size)
    assert np.array_equal(got.rank.cpu().numpy().reshape(-1), rank)
    assert np.array_equal(got.ties.cpu().numpy().reshape(-1), ties)
    if check_logp:
        assert_logp_close(got.logp, logp, lse, vocab_size or logits.shape[-1], ref.logp)
    return got


@contextlib.contextmanager
def num_threads(n):
    """The CPU kernel takes its thread count from torch.get_num_threads()."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Every backend against the reference and truth
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("lead,layout", [((64,), layout) for layout in LAYOUTS_2D] + [
    ((4, 16), "contiguous"), ((4, 16), "vocab_major"), ((4, 16), "lead_permuted"),
    ((4, 16), "col_slice")], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_dtypes_and_layouts(backend, device, dtype, lead, layout):
    logits = make_logits(lead, 1001, dtype, layout, device=device)
    expect_correct(backend, logits, make_targets(logits))


# V = 1: a single column (rank 0, ties 0, logp 0); 2049 and 4099 cross the CPU kernel's 2048-logit
# chunk boundary, leaving a short last chunk and sums carried from chunk to chunk.
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [1, 2, 3, 17, 1001, 2049, 4099])
def test_odd_vocab_sizes(backend, device, dtype, n_vocab):
    logits = make_logits((33,), n_vocab, dtype, device=device)
    got = expect_correct(backend, logits, make_targets(logits, ignore_frac=0.1))
    if n_vocab == 1:
        kept = got.rank >= 0
        assert (got.rank[kept] == 0).all() and (got.logp[kept] == 0).all()


# GPT-2, Pythia (padded), Llama 3, Qwen 2: real output-layer widths, few rows to stay fast.
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [50257, 50304, 128256, 151936])
def test_real_vocab_sizes(backend, device, dtype, n_vocab):
    logits = make_logits((6,), n_vocab, dtype, device=device)
    expect_correct(backend, logits, make_targets(logits, ignore_frac=0.2))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("lead,n_vocab", [((3000,), 129), ((8, 256), 33)])
def test_many_rows(backend, device, dtype, lead, n_vocab):
    logits = make_logits(lead, n_vocab, dtype, device=device)
    expect_correct(backend, logits, make_targets(logits))


def test_more_than_eight_leading_dims(backend, device):
    # The C++ kernel walks at most 8 row dimensions in place; more are reshaped first.
    lead = (2, 1, 3, 1, 2, 1, 2, 1, 2)
    logits = make_logits(lead, 19, torch.float32, "lead_permuted", device=device)
    expect_correct(backend, logits, make_targets(logits))


def test_broadcast_row_with_zero_stride(backend, device):
    row = make_logits((1,), 501, torch.bfloat16, device=device)
    logits = row.expand(7, 501)                                      # lead stride 0
    targets = torch.tensor([0, 500, 3, -100, 250, 17, 499], device=device)
    expect_correct(backend, logits, targets)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index,pattern", [
    (-100, "random"), (-1, "random"), (-100, "all_but_one"), (-1, "all_but_one"),
    (0, "random"),         # an ignore_index inside [0, V): class 0 is dropped
    (10 ** 6, "random"),   # one beyond any class
])
def test_ignore_index(backend, device, dtype, ignore_index, pattern):
    logits = make_logits((40,), 257, dtype, device=device)
    targets = make_targets(logits, ignore_frac=0.4, ignore_index=ignore_index).cpu()
    targets[targets == 0] = 1                  # keep class 0 meaning "ignored" only where chosen
    targets[:3] = ignore_index
    if pattern == "all_but_one":
        targets[:] = ignore_index
        targets[17] = 5
    targets = targets.to(device)
    got = expect_correct(backend, logits, targets, ignore_index=ignore_index)
    dropped = targets == ignore_index
    assert (got.rank[dropped] == -1).all() and (got.ties[dropped] == 0).all()
    assert (got.logp[dropped] == 0).all() and (got.rank[~dropped] >= 0).all()


def test_all_ignored_rows_get_the_ignored_convention(backend, device):
    logits = make_logits((5,), 11, torch.float32, device=device)
    got = rankops.token_stats(logits, torch.full((5,), -7, device=device), ignore_index=-7,
                              backend=backend)
    assert got.rank.tolist() == [-1] * 5 and got.ties.tolist() == [0] * 5
    assert got.logp.tolist() == [0.0] * 5


@pytest.mark.parametrize("target_dtype", [torch.int8, torch.int16, torch.int32, torch.int64],
                         ids=str)
def test_integer_target_dtypes(backend, device, target_dtype):
    logits = make_logits((20,), 100, torch.float32, device=device)
    targets = make_targets(logits).to(target_dtype)
    expect_correct(backend, logits, targets)


# Padded columns hold the dtype's largest finite value, above every real logit: counting any of
# them would raise every rank and swamp logsumexp.
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab,vocab_size", [(1001, 1000), (1001, 1), (1001, 500),
                                                (50304, 50277)])  # Pythia's padded head
def test_vocab_size_truncation(backend, device, dtype, n_vocab, vocab_size):
    logits = make_logits((9,), n_vocab, dtype, device=device)
    logits[:, vocab_size:] = torch.finfo(dtype).max
    targets = make_targets(logits, vocab_size)
    got = expect_correct(backend, logits, targets, vocab_size=vocab_size)
    kept = targets != -100
    assert (got.rank[kept] + got.ties[kept] < vocab_size).all()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [17, 300, 4099, 50257])
def test_many_ties(backend, device, dtype, n_vocab):
    # Logits on a few levels, as bf16 models produce: most targets tie with many competitors.
    g = torch.Generator().manual_seed(5)
    n_rows = 64 if n_vocab < 10000 else 8
    logits = (torch.randint(-2, 3, (n_rows, n_vocab), generator=g) * 0.5).to(dtype).to(device)
    got = expect_correct(backend, logits, make_targets(logits, ignore_frac=0.1))
    assert (got.ties > n_vocab // 10).float().mean() > 0.5


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_wide_dynamic_range(backend, device, dtype):
    # The CPU kernel sums exp(z - ref) with ref starting at the target logit and moving up only
    # when a chunk's max passes it by a margin: these rows make it move late, often, or never.
    n_vocab = 4099
    logits = make_logits((6,), n_vocab, torch.float32, seed=3)
    targets = torch.tensor([0, 1, 0, 3, n_vocab - 1, 5])
    logits[0, 0], logits[0, 3077] = 0.0, 200.0               # a far larger logit in the last chunk
    logits[1], logits[1, 1] = -100.0, 0.0                    # target far above every other logit
    logits[2] = torch.arange(n_vocab) * 0.1                  # rising ramp: a new max every chunk
    logits[3, 3] = -1e4                                      # target far below every other logit
    logits[4] = torch.arange(n_vocab).flip(0) * 0.1          # falling ramp, target last
    logits[5] *= 30                                          # logp in the hundreds
    expect_correct(backend, logits.to(dtype).to(device), targets.to(device))


# ---------------------------------------------------------------------------------------------
# Few rows with a big vocabulary: the CPU kernel splits each row across threads
# ---------------------------------------------------------------------------------------------

# With fewer rows than threads the kernel cuts each row into up to V / 16384 slices and merges
# the partials (log-add-exp, integer counts). V = 100003 makes slices of uneven, non-chunk length.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_rows,threads,n_vocab", [
    (1, 2, 262144), (2, 2, 262144), (1, 8, 262144), (2, 8, 262144), (3, 8, 100003)])
def test_few_rows_big_vocab(backend, device, dtype, n_rows, threads, n_vocab):
    logits = make_logits((n_rows,), n_vocab, dtype, device=device)
    targets = make_targets(logits, ignore_frac=0.0)
    if n_rows == 3:
        targets[1] = -100                                  # an ignored row between split rows
    # Copies of each target's value in every slice: ties must add up across the merge.
    for r in range(n_rows):
        if int(targets[r]) >= 0:
            logits[r, ::n_vocab // 9] = logits[r, targets[r]]
    with num_threads(threads):
        expect_correct(backend, logits, targets)


@pytest.mark.parametrize("threads", [2, 8])
def test_few_rows_big_vocab_truncated(backend, device, threads):
    logits = make_logits((2,), 262144, torch.bfloat16, device=device)
    logits[:, 200000:] = torch.finfo(torch.bfloat16).max
    targets = make_targets(logits, 200000, ignore_frac=0.0)
    with num_threads(threads):
        expect_correct(backend, logits, targets, vocab_size=200000)


# ---------------------------------------------------------------------------------------------
# Reference-free invariances
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [3, 1001, 50257])
def test_adding_a_constant_changes_nothing(backend, device, dtype, n_vocab):
    # Integers in [-8, 8] and their shift by 8 are exact in every dtype, so every difference
    # z_v - z_t and z_v - max is exact too: ranks and ties must not move, and logp can only
    # differ by roundings at the magnitude of lse = z_t - logp, at most 16 + |logp|.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-8, 9, (16, n_vocab), generator=g).to(dtype).to(device)
    targets = make_targets(logits)
    base = rankops.token_stats(logits, targets, backend=backend)
    shifted = rankops.token_stats(logits + 8.0, targets, backend=backend)
    assert torch.equal(base.rank, shifted.rank) and torch.equal(base.ties, shifted.ties)
    tol = 2.0 ** -24 * growth(n_vocab) * (16 + base.logp.abs())
    assert ((base.logp - shifted.logp).abs() <= tol).all()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [1, 3, 1001, 50257])
@pytest.mark.parametrize("value", [0.0, -3.25, 7.5])
def test_equal_logits(backend, device, dtype, n_vocab, value):
    logits = torch.full((4, n_vocab), value, dtype=dtype, device=device)
    targets = torch.tensor([0, n_vocab - 1, n_vocab // 2, -100], device=device)
    got = rankops.token_stats(logits, targets, backend=backend)
    assert got.rank.tolist() == [0, 0, 0, -1]
    assert got.ties.tolist() == [n_vocab - 1] * 3 + [0]
    want = -math.log(n_vocab)
    lse = value + math.log(n_vocab)
    tol = 2.0 ** -24 * growth(n_vocab) * max(1.0, abs(want), abs(lse))
    assert all(abs(lp - want) <= tol for lp in got.logp[:3].tolist()), got.logp


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_strictly_decreasing_logits_rank_is_the_index(backend, device, dtype):
    # z_v = -v (exact up to 256 in bf16): rank(t) = t, no ties, and
    # logp = -t - log(sum_v e^-v) = -t - log((1 - e^-V) / (1 - e^-1)) in closed form.
    n_vocab = 256
    logits = (-torch.arange(n_vocab, dtype=torch.float32)).to(dtype).expand(6, n_vocab).to(device)
    targets = [0, n_vocab - 1, 1, 17, 128, 254]
    got = rankops.token_stats(logits, torch.tensor(targets, device=device), backend=backend)
    assert got.rank.tolist() == targets and got.ties.tolist() == [0] * 6
    lse = math.log((1 - math.exp(-n_vocab)) / (1 - math.exp(-1)))
    want = np.array([-t - lse for t in targets])
    assert_logp_close(got.logp, want, np.full(6, lse), n_vocab)


# ---------------------------------------------------------------------------------------------
# Every finite half-precision value in one row
# ---------------------------------------------------------------------------------------------

def every_finite(dtype):
    """All finite values of a 16-bit float (-0 and +0, subnormals, +-max), in shuffled order."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[torch.isfinite(values)]
    return values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_finite_half_value(backend, device, dtype):
    # Exercises the kernel's bit-level half -> float conversion (fp16 subnormals are rescaled by
    # 2^112 in fp32): a value converted wrong moves some target's rank or tie count.
    row = every_finite(dtype)
    assert row.numel() == {torch.float16: 63488, torch.bfloat16: 65280}[dtype]
    info = torch.finfo(dtype)
    picks = [info.max, -info.max, 0.0, -0.0, info.smallest_normal, -info.smallest_normal,
             info.smallest_normal * info.eps,                   # the smallest subnormal
             1.0, -1.0, 0.5]
    picked = torch.tensor(picks, dtype=torch.float32).to(dtype)
    targets = [int(torch.nonzero(row == p)[0]) for p in picked]
    # +0 and -0 compare equal, so pick each one's own bit pattern for those two targets.
    sign_bits = row.view(torch.int16)
    targets[2] = int(torch.nonzero(sign_bits == 0)[0])
    targets[3] = int(torch.nonzero(sign_bits == -2 ** 15)[0])
    targets += torch.randint(0, row.numel(), (6,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = row.to(device).expand(len(targets), row.numel())
    got = expect_correct(backend, logits, torch.tensor(targets, device=device))
    assert got.rank[0] == 0 and got.ties[0] == 0
    assert got.ties[2] == 1 and got.ties[3] == 1        # +0 and -0 tie with each other


# ---------------------------------------------------------------------------------------------
# Each compiled CPU instruction set
# ---------------------------------------------------------------------------------------------

def isa_cases():
    """(name, logits, targets, threads) for the per-ISA tests: every load path of the kernel."""
    cases = []
    for dtype in KERNEL_DTYPES:
        name = str(dtype).split(".")[-1]
        logits = make_logits((64,), 4099, dtype, seed=11)
        cases.append((f"{name}-contiguous", logits, make_targets(logits), None))
        logits = make_logits((64,), 1001, dtype, "vocab_major", seed=12)     # strided gather
        cases.append((f"{name}-vocab_major", logits, make_targets(logits), None))
        logits = make_logits((1,), 262144, dtype, seed=13)                   # split row
        cases.append((f"{name}-split", logits, make_targets(logits, ignore_frac=0), 4))
    g = torch.Generator().manual_seed(14)
    logits = (torch.randint(-2, 3, (64, 300), generator=g) * 0.5).to(torch.bfloat16)
    cases.append(("bfloat16-ties", logits, make_targets(logits), None))
    row = every_finite(torch.float16)
    targets = torch.randint(0, row.numel(), (8,), generator=torch.Generator().manual_seed(15))
    cases.append(("float16-every-value", row.expand(8, row.numel()), targets, None))
    return cases


ISA_CASES = isa_cases()


@needs_cpu_kernel
@pytest.mark.parametrize("case", ISA_CASES, ids=[c[0] for c in ISA_CASES])
def test_each_isa_ranks_and_ties_exact(cpu_isa, case):
    _, logits, targets, threads = case
    with num_threads(threads or torch.get_num_threads()):
        expect_correct("cpu", logits, targets, check_logp=False)


def logp_battery():
    """Rows that stress the exp sum: top-1 targets (|logp| < 1, so nothing hides the sum's
    error), rows of repeated values (bf16 levels, a one-hot row) whose rounding errors add up
    with one sign, and random targets across chunk boundaries and a split row."""
    rows = []
    for dtype in KERNEL_DTYPES:
        for n_vocab in (1001, 4099):
            logits = make_logits((64,), n_vocab, dtype, seed=21)
            rows.append((logits, logits.float().argmax(-1)))
            rows.append((logits, make_targets(logits, seed=22)))
    g = torch.Generator().manual_seed(23)
    levels = (torch.randint(0, 3, (64, 4096), generator=g) * 1.0).to(torch.bfloat16)
    rows.append((levels, make_targets(levels)))
    one_hot = torch.zeros(4, 2048)
    one_hot[:, 0] = 1.0
    rows.append((one_hot, torch.tensor([0, 1, 2047, 2])))
    split = make_logits((1,), 262144, torch.float32, seed=24)
    rows.append((split, split.argmax(-1)))
    return rows


# On x86 the avx2 and baseline builds sum exp() one element at a time in fp32 (see the reason);
# on other machines the one baseline build may well be vectorised.


@needs_cpu_kernel
def test_each_isa_logp_within_bound(cpu_isa):
    for logits, targets in logp_battery():
        with num_threads(4 if logits.shape[0] == 1 else torch.get_num_threads()):
            expect_correct("cpu", logits, targets)


# ---------------------------------------------------------------------------------------------
# Non-finite logits
# ---------------------------------------------------------------------------------------------

NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("column", ["target", "other"])
def test_nonfinite_in_kept_row_raises(backend, device, dtype, bad, column):
    logits = make_logits((2, 3), 301, dtype, device=device)
    targets = make_targets(logits, ignore_frac=0.0)
    col = int(targets[1, 1]) if column == "target" else (int(targets[1, 1]) + 7) % 301
    logits[1, 1, col] = bad
    logits[1, 2, 5] = bad         # the message names the first bad row, not this later one
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 1\).*check_finite"):
        rankops.token_stats(logits, targets, backend=backend)


@pytest.mark.parametrize("threads", [2, 8])
def test_nonfinite_reports_first_bad_row_in_split_path(backend, device, threads):
    logits = make_logits((3,), 100003, torch.float32, device=device)
    logits[1, 99999] = float("nan")
    logits[2, 3] = float("inf")
    with num_threads(threads), pytest.raises(ValueError, match=r"\(1,\).*check_finite"):
        rankops.token_stats(logits, make_targets(logits, ignore_frac=0.0), backend=backend)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "+inf", "-inf"])
def test_nonfinite_in_ignored_row_or_padding_is_fine(backend, device, dtype, bad):
    logits = make_logits((6,), 301, dtype, device=device)
    targets = make_targets(logits, 300, ignore_frac=0.0)
    targets[4] = -100
    logits[4, 10] = bad                  # an ignored row
    logits[:, 300] = bad                 # a padded column beyond vocab_size
    expect_correct(backend, logits, targets, vocab_size=300)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_check_finite_false_with_neg_inf_is_exact(backend, device, dtype):
    # exp(-inf) = 0: a -inf logit ranks below everything and adds nothing to logsumexp. A -inf
    # target ranks below every finite logit, ties with the other -infs and has logp = -inf.
    logits = make_logits((5,), 4099, dtype, device=device)
    targets = make_targets(logits, ignore_frac=0.0)
    logits[0, ::3] = float("-inf")
    logits[0, targets[0]] = 1.5                           # the target itself stays finite
    logits[1, 100:3000] = float("-inf")
    targets[1] = 200                                      # a -inf target
    logits[2, :-1] = float("-inf")
    targets[2] = 4098                                     # the only finite logit
    got = expect_correct(backend, logits, targets, check_finite=False)
    assert got.logp[1] == float("-inf") and got.rank[1] == 4099 - 2900
    assert got.ties[1] == 2899 and got.rank[2] == 0 and got.logp[2] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_check_finite_false_ranks_follow_ieee(backend, device, bad):
    # NaN compares false (never greater, never tied); +inf is greater than every finite value.
    # logp of such rows is left unspecified ("may be NaN"), so only the counts are checked.
    logits = make_logits((4,), 101, torch.float32, device=device)
    targets = make_targets(logits, ignore_frac=0.0)
    logits[0, (int(targets[0]) + 1) % 101] = bad
    logits[1, targets[1]] = bad
    got = expect_correct(backend, logits, targets, check_finite=False, check_logp=False)
    ref = truth(logits[2:], targets[2:])
    assert_logp_close(got.logp[2:], ref[2], ref[3], 101)   # untouched rows keep exact logp


# ---------------------------------------------------------------------------------------------
# float64 logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["auto", "torch"])
def test_float64_logits(backend_name):
    logits = make_logits((4, 8), 1001, torch.float64, "vocab_major")
    targets = make_targets(logits)
    got = expect_correct(backend_name, logits, targets)
    assert got.logp.dtype == torch.float64


@needs_cpu_kernel
def test_float64_on_cpu_kernel_is_a_type_error():
    logits = make_logits((4,), 10, torch.float64)
    with pytest.raises(TypeError, match=r"backend 'cpu'.*float64"):
        rankops.token_stats(logits, make_targets(logits), backend="cpu")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument
# ---------------------------------------------------------------------------------------------

LOGITS = make_logits((3,), 5, torch.float32)
TARGETS = torch.tensor([0, 1, 4])


def call_with(**changes):
    kwargs = dict(logits=LOGITS, targets=TARGETS)
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = [
    ("logits-list", call_with(logits=LOGITS.tolist()), TypeError, "logits must be a torch.Tensor"),
    ("logits-numpy", call_with(logits=LOGITS.numpy()), TypeError, "logits must be a torch.Tensor"),
    ("logits-int", call_with(logits=LOGITS.long()), TypeError, "logits must be a floating"),
    ("logits-bool", call_with(logits=LOGITS > 0), TypeError, "logits must be a floating"),
    ("logits-complex", call_with(logits=LOGITS.to(torch.complex64)), TypeError, "logits"),
    ("logits-1d", call_with(logits=LOGITS[0], targets=TARGETS[0]), ValueError, "logits must have shape"),
    ("logits-0d", call_with(logits=LOGITS[0, 0], targets=TARGETS[0]), ValueError, "logits must have shape"),
    ("logits-V0", call_with(logits=LOGITS[:, :0]), ValueError, "logits.*V = 0"),
    ("empty-N0", call_with(logits=LOGITS[:0], targets=TARGETS[:0]), ValueError, "empty input.*logits"),
    ("empty-3d", call_with(logits=torch.zeros(2, 0, 5), targets=torch.zeros(2, 0, dtype=torch.long)),
     ValueError, "empty input.*logits"),
    ("targets-list", call_with(targets=[0, 1, 4]), TypeError, "targets must be a torch.Tensor"),
    ("targets-float", call_with(targets=TARGETS.float()), TypeError, "targets must be an integer"),
    ("targets-bool", call_with(targets=TARGETS > 0), TypeError, "targets must be an integer"),
    ("targets-short", call_with(targets=TARGETS[:2]), ValueError, "targets has shape"),
    ("targets-transposed", call_with(logits=torch.zeros(2, 3, 5), targets=torch.zeros(3, 2, dtype=torch.long)),
     ValueError, "targets has shape"),
    ("targets-flat-for-3d", call_with(logits=torch.zeros(2, 3, 5), targets=torch.zeros(6, dtype=torch.long)),
     ValueError, "targets has shape"),
    ("targets-device", call_with(targets=TARGETS.to("meta")), ValueError, "targets.*device|device.*targets"),
    ("target-negative", call_with(targets=torch.tensor([0, -1, 4])), ValueError, r"targets must lie in \[0, 5\)"),
    ("target-eq-V", call_with(targets=torch.tensor([0, 5, 4])), ValueError, r"targets must lie in \[0, 5\)"),
    ("target-default-ignore-under-custom", call_with(targets=torch.tensor([0, -100, 4]), ignore_index=-1),
     ValueError, "targets must lie"),
    ("target-ge-vocab_size", call_with(vocab_size=4), ValueError, r"targets must lie in \[0, 4\)"),
    ("ignore_index-float", call_with(ignore_index=-100.0), TypeError, "ignore_index"),
    ("ignore_index-bool", call_with(ignore_index=True), TypeError, "ignore_index"),
    ("vocab_size-0", call_with(vocab_size=0), ValueError, "vocab_size"),
    ("vocab_size-negative", call_with(vocab_size=-1), ValueError, "vocab_size"),
    ("vocab_size-gt-V", call_with(vocab_size=6), ValueError, "vocab_size"),
    ("vocab_size-float", call_with(vocab_size=4.0), TypeError, "vocab_size"),
    ("vocab_size-bool", call_with(vocab_size=True), TypeError, "vocab_size"),
    ("vocab_size-tensor", call_with(vocab_size=torch.tensor(4)), TypeError, "vocab_size"),
    ("backend-unknown", call_with(backend="gpu"), ValueError, "backend must be one of"),
    ("backend-case", call_with(backend="CPU"), ValueError, "backend must be one of"),
    ("backend-none", call_with(backend=None), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("kwargs,error,match", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("backend_name", ["auto", *HOST_BACKENDS])
def test_bad_input(backend_name, kwargs, error, match):
    if backend_name not in rankops.available_backends() + ["auto"]:
        pytest.skip(f"backend {backend_name!r} is not built")
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend_name)
    with pytest.raises(error, match=match):
        rankops.token_stats(kwargs.pop("logits"), kwargs.pop("targets"), **kwargs)


UNAVAILABLE = [b for b in BACKENDS if b != "auto" and b not in rankops.available_backends()]


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_unavailable_backend(name):
    with pytest.raises(ValueError, match=rf"backend '{name}' is not available"):
        rankops.token_stats(LOGITS, TARGETS, backend=name)


def test_ignore_index_out_of_int64_range_names_the_argument():
    with pytest.raises((TypeError, ValueError, OverflowError)) as info:
        rankops.token_stats(LOGITS, TARGETS, ignore_index=2 ** 70)
    if "ignore_index" not in str(info.value):
        pytest.fail(f"message does not name ignore_index: {info.value!r}")


# ---------------------------------------------------------------------------------------------
# Property: the C++ kernel agrees with the reference on random shapes, dtypes, strides, masks
# ---------------------------------------------------------------------------------------------

@needs_cpu_kernel
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_rows=st.integers(1, 40), n_vocab=st.integers(1, 300),
       dtype=st.sampled_from(KERNEL_DTYPES),
       layout=st.sampled_from(["contiguous", "col_slice", "vocab_major"]),
       integer_valued=st.booleans(), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2 ** 31 - 1), data=st.data())
def test_cpu_matches_torch_property(n_rows, n_vocab, dtype, layout, integer_valued, ignore_frac,
                                    seed, data):
    vocab_size = data.draw(st.one_of(st.none(), st.integers(1, n_vocab)), label="vocab_size")
    logits = make_logits((n_rows,), n_vocab, dtype, layout, seed=seed)
    if integer_valued:                  # few distinct values: many ties
        logits = logits.round()
    targets = make_targets(logits, vocab_size, seed=seed + 1, ignore_frac=ignore_frac)
    expect_correct("cpu", logits, targets, vocab_size=vocab_size)


def test_check_finite_must_be_bool():
    with pytest.raises(TypeError, match="check_finite"):
        rankops.token_stats(LOGITS, TARGETS, check_finite="no")
