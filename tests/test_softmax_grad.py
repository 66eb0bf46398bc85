"""softmax_grad: every backend against float64 truth computed from the formula

    grad[i, v] = s_i (exp(z[i, v] - lse_i) - [v == t_i])   for v < n_cols
    grad[i, v] = 0                                          for padded columns and ignored rows

with z, lse and s exactly as the kernels get them (bf16/fp16/fp32 and fp32 upcast exactly to
float64). Below d = z - lse, p = exp(d), u = 2^-24 (fp32's unit roundoff).

fp32 outputs, per element:
    |got - truth| <= u (|s| p (3 |d| + 6) + 2 |truth|) + |s| 2^-125 + 2^-126
Why: an fp32 pipeline rounds d, multiplies by a rounded log2(e) and rounds that product (or
reduces d by multiples of a rounded ln 2): three relative errors of u on exp's argument, each
worth u |d| relative in p (exp is that ill-conditioned; the bound grows with |d| for every fp32
implementation). exp2 itself is within 2 ulp (CUDA exp2f, ex2.approx; numpy and the CPU
polynomial within 1): 4 u p. Subtracting the one-hot term and multiplying by s round once each:
2 u |truth|. 2 u p is left for second-order terms. Results under the normal range may be flushed,
and the CPU kernel clamps exp's argument at -87 (p >= e^-87 ~ 1.4 2^-126): |s| 2^-125 + 2^-126
absolute, 38 orders of magnitude under the row's mass. A kernel that rounds z log2(e) before
subtracting lse log2(e) misses it by ~|z| / (3 |d| + 6): the row shifted by +1000 catches that.

bf16 / fp16 outputs: the fp32 value above rounds once to nearest even, so the output lies between
the truth's bounds rounded, rne(truth - E) <= got <= rne(truth + E) (rounding is monotone). Where E
is below half an ulp of the output dtype (everywhere here but under the floor: E is at most a few
hundred u relative, a half ulp 2^-9 (bf16) or 2^-12 (fp16); only a target with p within ~2^-12
(bf16) or ~2^-9 (fp16) of 1 cancels enough to break this), that leaves rne(truth) or one of its two
neighbours: both are asserted. Rounding itself is checked
exactly with rows whose gradient is +-s (z = [0, -1e4], lse = 0, t = 1): fp32 bit patterns over
every exponent, exact ties, subnormals, overflow and NaN.

Padded columns and ignored rows must be exactly 0, and +0.0 (all-zero bits) from the kernels.
"""
import numpy as np
import pytest
import torch

from rankops.ops.softmax_grad import softmax_grad

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
U = 2.0 ** -24
IGNORE = -100
# Output precision (significant bits) and the exponent of the smallest subnormal.
PRECISION = {torch.bfloat16: (8, -133), torch.float16: (11, -24)}


# ---------------------------------------------------------------------------------------------
# Truth and comparisons
# ---------------------------------------------------------------------------------------------

def truth(logits, targets, lse, scale, n_cols, ignore_index=IGNORE):
    """float64 gradient [N, V] and the fp32 error bound E [N, V] of the module docstring."""
    z = logits.detach().cpu().double().numpy()
    t = targets.cpu().numpy()
    s = scale.cpu().double().numpy()[:, None]
    d = z[:, :n_cols] - lse.cpu().double().numpy()[:, None]
    p = np.exp(d)
    keep = ((t != ignore_index) & (t >= 0) & (t < n_cols))[:, None]
    onehot = np.arange(n_cols)[None, :] == t[:, None]
    live = np.where(keep, s * (p - onehot), 0.0)
    bound = (U * (np.abs(s) * p * (3 * np.abs(d) + 6) + 2 * np.abs(live))
             + np.abs(s) * 2.0 ** -125 + 2.0 ** -126)
    want = np.zeros(z.shape)
    err_bound = np.zeros(z.shape)
    want[:, :n_cols] = live
    err_bound[:, :n_cols] = np.where(keep, bound, 0.0)
    return want, err_bound


def rne(x, dtype):
    """float64 values rounded to nearest even at dtype's precision (an exact float64 result;
    values past the dtype's range become inf on conversion). torch's float64 -> bf16/fp16
    conversion goes through float32 and rounds twice (1 + 2^-8 + 2^-30 becomes 1, not 1 + 2^-7)."""
    bits, min_exp = PRECISION[dtype]
    out = np.array(x, dtype=np.float64, copy=True)
    ok = np.isfinite(out) & (out != 0)
    _, e = np.frexp(out[ok])  # out = m 2^e, 0.5 <= |m| < 1
    quantum = np.ldexp(1.0, np.maximum(e - bits, min_exp))
    out[ok] = np.rint(out[ok] / quantum) * quantum  # np.rint: ties to even
    return out


def order_key(values):
    """Monotone integer key of 16-bit floats (adjacent values differ by 1; +0 and -0 are 0)."""
    b = values.contiguous().view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    return np.where(b & 0x8000, -(b & 0x7FFF), b)


def to_dtype(x, dtype):
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)  # exact for representable values


def assert_grad_close(got, want, bound, scale, dtype):
    got = got.detach().cpu()
    scale = scale.cpu().double().numpy()[:, None]
    assert got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        err = np.abs(got.double().numpy() - want)
        worst = np.unravel_index(np.argmax(err / np.maximum(bound, 1e-300)), err.shape)
        assert (err <= bound).all(), (
            f"fp32 error {err[worst]:.3g} over the bound {bound[worst]:.3g} at {worst} "
            f"(truth {want[worst]:.9g}, got {got[worst].item():.9g})")
        return
    key = order_key(got)
    nearest = order_key(to_dtype(rne(want, dtype), dtype))
    low = order_key(to_dtype(rne(want - bound, dtype), dtype))
    high = order_key(to_dtype(rne(want + bound, dtype), dtype))
    bad = (key < low) | (key > high)
    assert not bad.any(), (f"{int(bad.sum())} values outside the rounded error bounds, first at "
                           f"{np.argwhere(bad)[0]} (truth {want[bad][0]:.9g}, "
                           f"got {got.double().numpy()[bad][0]:.9g})")
    # Where p < 2^-100 the absolute floor of E dominates (the CPU clamp writes s e^-87, a normal
    # bf16 number many ulps from s p); the one-ulp claim is for everything above.
    floored = (np.abs(want) < np.abs(scale) * 2.0 ** -100) & (want != 0)
    far = (np.abs(key - nearest) > 1) & ~floored
    assert not far.any(), (f"{int(far.sum())} values more than one ulp from the rounded truth, "
                           f"first at {np.argwhere(far)[0]}")


def assert_zeros(t, backend):
    """Exact zeros; all-zero bits (+0.0) from the kernels. The torch reference may write -0.0
    (0 times a negative one-hot term at column 0 of an ignored row)."""
    assert (t == 0).all()
    if backend != "torch":
        assert not torch.signbit(t).any(), "kernels write +0.0 (all-zero bits)"


def run(backend, logits, targets, lse, scale, n_cols, ignore_index=IGNORE):
    before = logits.clone()
    grad = softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, backend)
    assert torch.equal(logits, before), "the logits were written to"
    assert grad.shape == logits.shape and grad.dtype == logits.dtype and grad.is_contiguous()
    return grad


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def as_layout(values, layout, device):
    """values [N, V] copied into storage of the named layout on device (built there: .to() would
    make a gappy layout contiguous)."""
    n_rows, n_vocab = values.shape
    if layout == "contiguous":
        out = torch.empty(n_rows, n_vocab, dtype=values.dtype, device=device)
    elif layout == "col_slice":    # a storage offset, rows longer than V
        out = torch.zeros(n_rows, n_vocab + 3, dtype=values.dtype, device=device)[:, 1:-2]
    elif layout == "every_other":  # column stride 2
        out = torch.zeros(n_rows, 2 * n_vocab, dtype=values.dtype, device=device)[:, ::2]
    elif layout == "vocab_major":  # the transpose of a contiguous [V, N]
        out = torch.zeros(n_vocab, n_rows, dtype=values.dtype, device=device).t()
    else:
        raise ValueError(layout)
    out.copy_(values.to(device))
    return out


def make_case(n_rows, n_vocab, n_cols, dtype, layout="contiguous", device="cpu", seed=0):
    """Logits [n_rows, n_vocab] stored with the named layout, int64 targets, fp32 lse and scale.

    Row 0 targets its argmax, rows 1 and 2 columns 0 and n_cols - 1, row 3 is ignored; with 7
    rows or more, row 4 is shifted by +1000 (z log2(e) alone would lose ~2^-14 there), row 5 has
    every 7th column 150 below the rest (exp underflows, d < -87) and row 6 has scale 0; the rest
    are random, about a quarter of them ignored."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n_rows, n_vocab, generator=g) * 4
    targets = torch.randint(0, n_cols, (n_rows,), generator=g)
    targets[torch.rand(n_rows, generator=g) < 0.25] = IGNORE
    scale = torch.randn(n_rows, generator=g)
    if n_rows >= 7:
        values[4] += 1000
        values[5, ::7] -= 150
        scale[6] = 0.0
        targets[4:7] = torch.tensor([n_cols // 2, n_cols // 3, n_cols - 2])
    values = values.to(dtype)
    firsts = [int(values[0, :n_cols].float().argmax()), 0, n_cols - 1, IGNORE]
    targets[:min(4, n_rows)] = torch.tensor(firsts[:n_rows])
    lse = torch.logsumexp(values[:, :n_cols].float(), dim=1)
    return (as_layout(values, layout, device), targets.to(device), lse.to(device),
            scale.to(device))


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def check_against_truth(backend, logits, targets, lse, scale, n_cols, dtype):
    """One backend's gradient against the float64 truth, with exact zeros where it must have them."""
    grad = run(backend, logits, targets, lse, scale, n_cols)
    want, bound = truth(logits, targets, lse, scale, n_cols)
    assert_grad_close(grad, want, bound, scale, dtype)
    assert_zeros(grad[:, n_cols:], backend)
    assert_zeros(grad[targets == IGNORE], backend)


LAYOUTS = ("contiguous", "col_slice", "every_other", "vocab_major")


# 203 columns: odd, so bf16/fp16 rows start at every offset from a 16-byte boundary (the CUDA
# kernel's scalar head and tail); n_cols 200 leaves 3 padded columns.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_cols", [203, 200])
def test_matches_truth(backend, device, dtype, layout, n_cols):
    logits, targets, lse, scale = make_case(24, 203, n_cols, dtype, layout, device)
    check_against_truth(backend, logits, targets, lse, scale, n_cols, dtype)


# The CPU kernel is compiled once per instruction set; each one runs here (the others above run
# only the widest this CPU supports).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_instruction_sets(cpu_isa, dtype):
    logits, targets, lse, scale = make_case(24, 2053, 2050, dtype)
    check_against_truth("cpu", logits, targets, lse, scale, 2050, dtype)


# Real output-layer widths: GPT-2 (50257, odd), Pythia (50304 padded from 50277), Llama 3
# (128256): several column blocks per row on every backend.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab,n_cols", [(50257, 50257), (50304, 50277), (128256, 128256)])
def test_real_vocab_sizes(backend, device, dtype, n_vocab, n_cols):
    logits, targets, lse, scale = make_case(7, n_vocab, n_cols, dtype, device=device)
    check_against_truth(backend, logits, targets, lse, scale, n_cols, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_column(backend, device, dtype):
    # V = 1: softmax is 1, so every kept row's gradient is exactly s (1 - 1) = 0.
    logits = torch.randn(5, 1).to(dtype).to(device)
    targets = torch.tensor([0, IGNORE, 0, 0, IGNORE], device=device)
    lse = logits.float()[:, 0].contiguous()
    scale = torch.tensor([1.0, 2.0, -3.0, 0.5, 1.0], device=device)
    grad = run(backend, logits, targets, lse, scale, 1)
    assert (grad.float() == 0).all()
    assert_zeros(grad[targets == IGNORE], backend)


def rounding_scales():
    """fp32 scales whose rounding to bf16/fp16 is delicate: random bit patterns over every
    exponent, exact ties (kept half odd and even), fp32 and fp16 subnormals, fp16's overflow edge
    (65504, 65519.996, 65520), bf16's, infinities, NaNs (a NaN's low bits must not carry into the
    sign under a naive rounding add), signed zeros."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2 ** 32, 300, dtype=np.uint64).astype(np.uint32)
    bf16_ties = (rng.integers(0, 2 ** 16, 40, dtype=np.uint32) << 16) | 0x8000
    # fp16 ties: an fp16 value plus half its ulp, normal and subnormal.
    h = rng.integers(1, 0x7BFF, 40, dtype=np.uint16)
    h = np.concatenate([h, np.arange(1, 20, dtype=np.uint16)])
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    fp16_ties = ((lo + hi) / 2).astype(np.float32).view(np.uint32)
    special = np.array([0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00400000, 0x7F7FFFFF,
                        0x7F7F8000, 0x7F7FFFFF, 0x7F7F7FFF, 0x477FE000, 0x477FEFFF, 0x477FF000,
                        0x33000000, 0x33000001, 0x32FFFFFF, 0x387FC000, 0x387FE000, 0x7F800000,
                        0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF],
                       dtype=np.uint32)
    bits = np.concatenate([random, bf16_ties, fp16_ties, special]).astype(np.uint32)
    bits = np.concatenate([bits, bits ^ 0x80000000])  # both signs
    return torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)


# Triton's interpreter computes masked-off lanes too, in numpy (inf * 0 there, and fp16 overflow
# to inf where it is the right answer), which numpy reports.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                            "ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding(backend, device, dtype):
    # z = [0, -1e4], lse = 0, t = 1: p = [1, 0] (exp(-1e4) is 0 in fp32, or at most e^-87
    # against 1 on the CPU), so the gradient row is exactly [s, -s] in fp32 and the output is
    # s rounded to the dtype, nothing else.
    scale = rounding_scales()
    n_rows = scale.numel()
    logits = torch.tensor([[0.0, -1e4]]).repeat(n_rows, 1).to(dtype).to(device)
    targets = torch.ones(n_rows, dtype=torch.int64, device=device)
    lse = torch.zeros(n_rows, device=device)
    grad = run(backend, logits, targets, lse, scale.to(device), 2).cpu()
    s = scale.double().numpy()
    want = np.stack([s, -s], axis=1)
    nan = np.isnan(want)
    assert torch.isnan(grad[torch.from_numpy(nan)]).all(), "NaN scales must give NaN"
    if dtype == torch.float32:
        assert np.array_equal(grad.double().numpy()[~nan], want[~nan])
        return
    expected = to_dtype(rne(np.where(nan, 0.0, want), dtype), dtype)
    got_key, want_key = order_key(grad), order_key(expected)
    wrong = ~nan & (got_key != want_key)
    assert not wrong.any(), (f"{int(wrong.sum())} values not rounded to nearest even, e.g. s = "
                             f"{want[wrong][:4]} -> {grad.double().numpy()[wrong][:4]}, "
                             f"want {expected.double().numpy()[wrong][:4]}")
    # Signed zeros are exact too: -0.0 scales give -0.0 in column 0.
    assert torch.equal(torch.signbit(grad[~torch.from_numpy(nan)]),
                       torch.signbit(expected[~torch.from_numpy(nan)]))


def test_out_of_range_targets(backend, device):
    # Unvalidated targets outside [0, n_cols) other than ignore_index: the GPU kernels treat the
    # row as ignored and read nothing (n_cols and n_cols + 2 still lie inside the 203-column
    # rows); the CPU kernel reports them; the torch reference assumes validated input.
    logits, targets, lse, scale = make_case(8, 203, 200, torch.float32, device=device)
    bad = torch.tensor([-1, 200, 202, 10 ** 12, -(10 ** 12)], device=device)
    targets[3:] = bad
    if backend == "torch":
        pytest.skip("the torch reference takes validated targets only")
    if backend == "cpu":
        with pytest.raises(ValueError, match="targets: row 3"):
            softmax_grad(logits, targets, lse, scale, IGNORE, 200, backend)
        return
    grad = run(backend, logits, targets, lse, scale, 200)
    assert_zeros(grad[3:], backend)
    want, bound = truth(logits, targets, lse, scale, 200)
    assert_grad_close(grad[:3], want[:3], bound[:3], scale[:3], torch.float32)


def test_more_than_2_31_elements(backend, device):
    # 32769 x 65536 bf16 = 2^31 + 2^16 elements (4 GiB in, 4 GiB out): the last row's offsets
    # pass 2^31 elements and 2^32 bytes; a 32-bit offset would write it over the first rows.
    if device.type != "cuda":
        pytest.skip("N * V > 2^31 takes ~9 GB and minutes on the host: GPU backends only")
    n_rows, n_vocab = 32769, 65536
    if torch.cuda.mem_get_info(device)[0] < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(n_rows, n_vocab, dtype=torch.bfloat16, device=device)
    logits.normal_(0.0, 4.0, generator=g)
    targets = torch.randint(0, n_vocab, (n_rows,), device=device, generator=g)
    targets[[0, -2, -1]] = torch.tensor([0, n_vocab - 1, 12345], device=device)
    lse = torch.cat([torch.logsumexp(c.float(), dim=1) for c in logits.split(2048)])
    scale = torch.randn(n_rows, device=device, generator=g)
    grad = softmax_grad(logits, targets, lse, scale, IGNORE, n_vocab, backend)
    rows = torch.tensor([0, 1, n_rows // 2, n_rows - 3, n_rows - 2, n_rows - 1], device=device)
    want, bound = truth(logits[rows], targets[rows], lse[rows], scale[rows], n_vocab)
    assert_grad_close(grad[rows], want, bound, scale[rows], torch.bfloat16)
