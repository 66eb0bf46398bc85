"""linear_token_stats: token_stats of hidden @ weight.T + bias without the [N, V] logits.

Integer-valued inputs make every product and sum exact (|logit| < 256 is exact in bf16 too), so
the block path's logits equal F.linear's and every result must equal token_stats on the full
logits bit for bit, on the same backend. Random inputs agree within rounding.

Inputs are made on the CPU and moved to where the backend needs them (device_for: a GPU for
"triton" unless it runs interpreted); references are computed, and results compared, on the CPU."""
import pytest
import torch
import torch.nn.functional as F

import rankops
from conftest import runs_on_host
from rankops.ops import linear_token_stats as lts
from rankops.ops.token_stats import TokenStats

HOST = [b for b in ("triton", "cpu", "torch") if b in rankops.available_backends()]
SLICE = 16384
V = 40000  # not a multiple of any block size used here: a short last block
# The Triton backend runs under its interpreter here (slow per tile): a smaller vocabulary,
# still not a multiple of its tiles (128 on a GPU, up to 1024 interpreted), cut into 3
# programs' splits of 1024 columns, so that split and tile boundaries lie inside it.
V_TRITON, SPLIT_TRITON = 3000, 1024


def device_for(backend):
    """Where a backend's inputs must live: "triton" takes CUDA tensors, or CPU tensors under its
    interpreter (conftest's runs_on_host); the others here (and "auto"), CPU tensors."""
    if backend == "triton" and not runs_on_host(backend) and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def on(device, *tensors):
    """The tensors moved to device (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def to_cpu(stats):
    return TokenStats(*(x.cpu() for x in stats))


def sizes(backend):
    """(V, block_size, the first column of the second block) for a backend's tests."""
    if backend == "triton":
        return V_TRITON, SPLIT_TRITON, SPLIT_TRITON
    return V, SLICE, SLICE


def int_inputs(n, d, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    weight = torch.randint(-3, 4, (v, d), generator=g).to(dtype)
    b = torch.randint(-3, 4, (v,), generator=g).to(dtype) if bias else None
    return hidden, weight, b


def boundary_targets(n, v, seed=1, block=SLICE):
    """Random targets with the block and slice boundaries among them, and two ignored rows."""
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[:4] = torch.tensor([0, block - 1, block, v - 1])
    t[7] = t[11] = -100
    return t


def assert_same(got, want):
    for name, a, b in zip(("rank", "ties", "logp"), got, want):
        a, b = a.cpu(), b.cpu()  # compared on one device (a GPU backend's results on the host)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


# The Triton backend's logsumexp sums its tiles in another order than token_stats' kernels do:
# logp agrees to fp32 rounding of a sum of at most a few thousand positive terms.
LOGP_RTOL = LOGP_ATOL = 1e-5


def full_logits_stats(logits, targets, backend, **kwargs):
    """token_stats on F.linear's logits, on the backend whose logp is bit for bit comparable:
    the same one, except for "triton", which is compared with the C++ kernel (CPU tensors)."""
    return rankops.token_stats(logits, targets, backend="cpu" if backend == "triton" else backend, **kwargs)


def assert_stats_equal(got, want, backend):
    """rank and ties exactly; logp exactly, or within fp32 rounding of the sum on "triton"."""
    if backend != "triton":
        return assert_same(got, want)
    got, want = to_cpu(got), to_cpu(want)
    assert_same(got[:2], want[:2])
    assert got.logp.dtype == want.logp.dtype == torch.float32
    torch.testing.assert_close(got.logp, want.logp, rtol=LOGP_RTOL, atol=LOGP_ATOL, equal_nan=True)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_integer_inputs_equal_full_logits(backend, dtype, with_bias):
    """D = 27: not a multiple of any BLOCK_K (32, 64), and |logit| <= 27 * 9 + 3 < 256 is exact
    in bf16 (and fp16) too."""
    v, block, first = sizes(backend)
    hidden, weight, bias = int_inputs(300, 27, v, dtype, bias=with_bias)
    targets = boundary_targets(300, v, block=first)
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, backend)
    h, w, t, b = on(device_for(backend), hidden, weight, targets, bias)
    got = rankops.linear_token_stats(h, w, t, bias=b, backend=backend, block_size=block)
    assert int(got.ties.sum()) > 0  # ties occur and are counted
    assert_stats_equal(got, want, backend)


@pytest.mark.parametrize("backend,block_size", [("cpu", SLICE), ("cpu", 2 * SLICE), ("cpu", 3 * SLICE),
                                                ("cpu", 4 * SLICE), ("torch", 1000), ("torch", 7777),
                                                ("torch", 65536), ("triton", 128), ("triton", 384),
                                                ("triton", 4096)])
def test_block_sizes(backend, block_size, monkeypatch):
    """Blocks that do not divide V, one block wider than V, and (a small logits buffer) many row
    chunks per target block; on "triton", 24, 8 and 1 programs per row block."""
    if backend not in HOST:
        pytest.skip(f"no {backend} backend")
    v = sizes(backend)[0]
    monkeypatch.setattr(lts, "BUFFER_ELEMENTS", 5 * block_size)      # 5 rows a chunk
    monkeypatch.setattr(lts, "REFERENCE_ELEMENTS", 5 * v)
    hidden, weight, bias = int_inputs(64, 8, v, torch.float32, seed=2)
    targets = boundary_targets(64, v, seed=3, block=min(block_size, v - 1))
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, backend)
    h, w, t, b = on(device_for(backend), hidden, weight, targets, bias)
    got = rankops.linear_token_stats(h, w, t, bias=b, backend=backend, block_size=block_size)
    assert_stats_equal(got, want, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_inputs_within_rounding(dtype):
    """Logits from other matmul shapes may round differently: ranks may move only where two
    logits are within rounding of each other (rare), logp by rounding."""
    g = torch.Generator().manual_seed(4)
    n, d, v = 512, 64, 50000
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (0.3 * torch.randn(v, d, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    full = F.linear(hidden, weight, bias)
    for backend in [b for b in HOST if b != "triton"]:  # triton: test_triton_random_inputs
        want = rankops.token_stats(full, targets, backend=backend)
        got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=backend)
        assert (got.rank != want.rank).float().mean() <= 0.01
        assert (got.rank - want.rank).abs().max() <= 50
        assert (got.ties != want.ties).float().mean() <= 0.01
        tol = 1e-4 if dtype == torch.float32 else 0.05  # one bf16 rounding of a logit of ~|5|
        torch.testing.assert_close(got.logp, want.logp, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", HOST)
def test_vocab_size_padding(backend):
    """Padded weight rows (here the largest logits of all) never count."""
    v, block, first = sizes(backend)
    hidden, weight, bias = int_inputs(100, 8, v, torch.float32, seed=5)
    padded = torch.cat([weight, torch.full((64, 8), 3.0)])
    padded_bias = torch.cat([bias, torch.full((64,), 3.0)])
    targets = boundary_targets(100, v, seed=6, block=first)
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, backend)
    dev = device_for(backend)
    hidden, padded, padded_bias, targets = on(dev, hidden, padded, padded_bias, targets)
    got = rankops.linear_token_stats(hidden, padded, targets, bias=padded_bias, vocab_size=v,
                                     backend=backend, block_size=block)
    assert_stats_equal(got, want, backend)
    with pytest.raises(ValueError, match="targets"):  # a target in the padding is out of range
        rankops.linear_token_stats(hidden, padded, torch.full((100,), v + 1, device=dev), bias=padded_bias,
                                   vocab_size=v, backend=backend)


@pytest.mark.parametrize("backend", HOST)
def test_tied_weights_and_nd_hidden(backend):
    """The embedding's own weight as the output layer (a Parameter that requires grad), and
    hidden states [B, T, D]: results of the targets' shape, equal to the flat call."""
    v, block, _ = sizes(backend)
    emb = torch.nn.Embedding(v, 8)
    with torch.no_grad():
        emb.weight.copy_(torch.randint(-3, 4, (v, 8)).float())
    ids = torch.randint(0, v, (3, 50))
    hidden = emb(ids).detach() + torch.randint(-1, 2, (3, 50, 8)).float()  # [B, T, D]
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    want = full_logits_stats(F.linear(hidden, emb.weight.detach()), targets, backend)
    emb.to(device_for(backend))  # in place: its weight stays the Parameter that requires grad
    hidden, targets = on(emb.weight.device, hidden, targets)
    got = rankops.linear_token_stats(hidden, emb.weight, targets, backend=backend, block_size=block)
    assert got.rank.shape == got.logp.shape == (3, 50)
    assert not got.logp.requires_grad
    assert_stats_equal(got, want, backend)
    flat = rankops.linear_token_stats(hidden.reshape(-1, 8), emb.weight, targets.reshape(-1),
                                      backend=backend, block_size=block)
    assert_same([x.reshape(-1) for x in got], flat)
    # The weight as a strided view (here a transposed copy's transpose): strides are honoured.
    strided = emb.weight.detach().t().contiguous().t()
    assert_same(rankops.linear_token_stats(hidden, strided, targets, backend=backend, block_size=block), got)


@pytest.mark.parametrize("backend", HOST)
def test_ignore_index(backend):
    hidden, weight, bias = int_inputs(40, 8, 3000, torch.float32, seed=7)
    targets = torch.randint(0, 3000, (40,))
    targets[::3] = 2999  # ignore_index may be any int, a valid class index included
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, backend, ignore_index=2999)
    dev = device_for(backend)
    hidden, weight, bias, targets = on(dev, hidden, weight, bias, targets)
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, ignore_index=2999, backend=backend)
    assert_stats_equal(got, want, backend)
    assert (got.rank[::3] == -1).all() and (got.logp[::3] == 0).all() and (got.ties[::3] == 0).all()
    none = rankops.linear_token_stats(hidden, weight, torch.full((40,), -100, device=dev), backend=backend)
    assert (none.rank == -1).all() and (none.logp == 0).all()


@pytest.mark.parametrize("backend", HOST)
def test_nonfinite_logits(backend):
    """Non-finite bias entries make whole columns NaN or +-inf: raised by default, and with
    check_finite=False the same IEEE results as token_stats on the full logits."""
    v, block, first = sizes(backend)
    hidden, weight, bias = int_inputs(60, 8, v, torch.float32, seed=8)
    targets = boundary_targets(60, v, seed=9, block=first)
    dev = device_for(backend)
    h, w, t = on(dev, hidden, weight, targets)
    for cols, value in (([5], float("inf")), ([v // 2], float("nan")), ([5, 3 * v // 4], float("inf")),
                        (list(range(0, v, 2)), float("-inf"))):
        b = bias.clone()
        b[cols] = value
        if value == float("inf") and len(cols) == 2:
            b[v - 1000] = float("nan")  # +inf and NaN in different blocks: NaN wins
        with pytest.raises(ValueError, match="non-finite"):
            rankops.linear_token_stats(h, w, t, bias=b.to(dev), backend=backend, block_size=block)
        want = full_logits_stats(F.linear(hidden, weight, b), targets, backend, check_finite=False)
        got = rankops.linear_token_stats(h, w, t, bias=b.to(dev), backend=backend,
                                         check_finite=False, block_size=block)
        assert_stats_equal(got, want, backend)


@pytest.mark.parametrize("backend", HOST)
def test_nonfinite_hidden(backend):
    """A NaN or inf in a hidden state makes its row's logits non-finite (inf * 0 = NaN, and the
    signs of inf * w mix): the error names that row's position; with check_finite=False the
    IEEE results of token_stats on the full logits (NaN logp, never greater nor equal)."""
    v, block, _ = sizes(backend)
    hidden, weight, bias = int_inputs(2 * 40, 8, v, torch.float32, seed=20)
    hidden = hidden.reshape(2, 40, 8)                  # [B, T, D]: the error names (b, t)
    targets = torch.randint(0, v, (2, 40), generator=torch.Generator().manual_seed(21))
    targets[0, 3] = -100                               # an ignored non-finite row is no error
    hidden[0, 3, 0] = float("nan")
    hidden[1, 17, 5] = float("inf")
    hidden[1, 30, :] = float("-inf")
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, backend, check_finite=False)
    hidden, weight, bias, targets = on(device_for(backend), hidden, weight, bias, targets)
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 17\)"):
        rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=backend, block_size=block)
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=backend,
                                     check_finite=False, block_size=block)
    assert_stats_equal(got, want, backend)
    assert got.logp[1, 17].isnan() and got.logp[1, 30].isnan()  # NaN columns in both rows
    assert got.rank[0, 3] == -1 and got.logp[0, 3] == 0


@pytest.mark.parametrize("backend", HOST)
def test_update_linear_equals_update(backend):
    v, block, first = sizes(backend)
    hidden, weight, bias = int_inputs(200, 8, v + 10, torch.bfloat16, seed=10)
    targets = boundary_targets(200, v, seed=11, block=first)
    a, b = rankops.RankAccumulator(v), rankops.RankAccumulator(v)
    # The same backend's kernel on the full logits (for triton the C++ one: its logp sums in
    # another order anyway, so there the counts are compared exactly and the sums closely).
    a.update(F.linear(hidden, weight, bias), targets, backend="cpu" if backend == "triton" else backend)
    dev = device_for(backend)  # b's state follows its first batch there
    hidden, weight, bias, targets = on(dev, hidden, weight, bias, targets)
    b.update_linear(hidden, weight, targets, bias=bias, backend=backend, block_size=block)
    assert int(a.n_tied) == int(b.n_tied) > 0
    if backend == "triton":
        da, db = a.decompose(), b.decompose()
        assert (da.ranks == db.ranks).all() and (da.counts == db.counts).all()
        assert abs(da.cross_entropy - db.cross_entropy) <= 1e-6 * abs(da.cross_entropy)
    else:
        assert torch.equal(a.stats, b.stats)
    before = b.stats.clone()
    with pytest.raises(ValueError, match="targets"):
        b.update_linear(hidden, weight, torch.full((200,), v + 5, device=dev), backend=backend)
    assert torch.equal(b.stats, before)  # a call that raises adds nothing


def test_no_logits_sized_allocation(monkeypatch):
    """Peak extra memory: no tensor of anything near N * V elements is allocated; the largest is
    the block buffer (BUFFER_ELEMENTS), here 1/20 of the logits."""
    monkeypatch.setattr(lts, "BUFFER_ELEMENTS", 1 << 22)
    if "cpu" not in HOST:
        pytest.skip("no cpu backend")
    from torch.profiler import ProfilerActivity, profile
    n, v = 2048, V
    hidden, weight, bias = int_inputs(n, 8, v, torch.float32, seed=12)
    targets = torch.randint(0, v, (n,))
    logits_bytes = n * v * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend="cpu")
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < largest <= lts.BUFFER_ELEMENTS * 4 <= logits_bytes / 19, (largest, logits_bytes)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden=torch.zeros(4)), ValueError, "hidden"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "hidden"),
    (dict(weight=torch.zeros(100, 7)), ValueError, "weight"),
    (dict(weight=torch.zeros(100, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.zeros(99)), ValueError, "bias"),
    (dict(bias=torch.zeros(100, dtype=torch.bfloat16)), TypeError, "bias"),
    (dict(targets=torch.zeros(4)), TypeError, "targets"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), ValueError, "targets"),
    (dict(targets=torch.tensor([0, 1, 100, 2])), ValueError, "targets"),
    (dict(vocab_size=101), ValueError, "vocab_size"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=1000, backend="cpu"), ValueError, "block_size"),
    (dict(block_size=1000, backend="triton"), ValueError, "block_size"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.float64), weight=torch.zeros(100, 8, dtype=torch.float64),
          backend="triton"), TypeError, "triton"),
    (dict(backend="cuda"), ValueError, "cuda"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(hidden=torch.zeros(0, 8), targets=torch.zeros(0, dtype=torch.int64)), ValueError, "empty"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(100, 8), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    # On the backend's device, so that the error is the argument's, not the device's.
    dev = device_for(args.get("backend"))
    hidden, weight, targets = on(dev, hidden, weight, targets)
    if args.get("bias") is not None:
        args["bias"] = args["bias"].to(dev)
    with pytest.raises(error, match=match):
        rankops.linear_token_stats(hidden, weight, targets, **args)


def test_auto_backend_and_the_op():
    """auto picks the C++ kernel for CPU tensors; the torch.library op gives the same results."""
    hidden, weight, bias = int_inputs(32, 8, 3000, torch.float32, seed=13)
    targets = torch.randint(0, 3000, (32,))
    host = "cpu" if "cpu" in HOST else "torch"  # auto's choice for CPU tensors
    want = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=host)
    assert_same(rankops.linear_token_stats(hidden, weight, targets, bias=bias), want)
    got = lts.linear_token_stats_op(hidden, weight, bias, targets, -100, 3000, 32768, host)
    assert_same(got[:3], want)


# The Triton backend's own cases (CPU tensors under TRITON_INTERPRET=1; kept small, the
# interpreter runs each tile in Python).
needs_triton = pytest.mark.skipif("triton" not in HOST, reason="no triton backend here")


def near_tie_count(full64, targets, tol):
    """Per row, the other columns whose exact (float64) logit lies within tol of the target's:
    the only comparisons that rounding may turn either way."""
    z_t = full64.gather(1, targets[:, None])
    return ((full64 - z_t).abs() <= tol).sum(1) - 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_random_inputs_near_ties_only(dtype):
    """Random inputs: the kernel's logits (tl.dot, fp32 accumulation, one rounding to the
    inputs' dtype) can differ from torch's matmul in the last bit. Every rank or tie count that
    differs from the torch backend's must be explained by columns within rounding of the
    target in exact arithmetic (|diff| <= the number of such near-ties), and logp agrees to the
    logits' rounding."""
    g = torch.Generator().manual_seed(22)
    n, d, v = 256, 80, 2500                              # D = 80: a short last K step
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (0.3 * torch.randn(v, d, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:3] = torch.tensor([0, 1023, 1024])
    dev = device_for("triton")
    got = to_cpu(rankops.linear_token_stats(*on(dev, hidden, weight, targets), bias=bias.to(dev),
                                            backend="triton", block_size=1024))
    want = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend="torch", block_size=1024)
    full64 = F.linear(hidden.double(), weight.double(), bias.double())
    # Two fp32 sums of the same D exact products differ by at most ~D * eps * sum |h w|; after
    # rounding to a 16-bit dtype, by one unit in its last place of the logit.
    ulp = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    scale = F.linear(hidden.double().abs(), weight.double().abs(), bias.double().abs())
    tol = (2 * d * 2.0 ** -24 * scale.max(1).values + ulp * full64.abs().max(1).values)[:, None]
    slack = near_tie_count(full64, targets, tol)
    assert ((got.rank - want.rank).abs() <= slack).all()
    assert ((got.rank + got.ties - want.rank - want.ties).abs() <= slack).all()
    if dtype != torch.float32:
        assert int(got.ties.sum()) > 0                   # 16-bit logits tie, and it shows
    assert (got.rank != want.rank).float().mean() <= 0.05
    # logp moves with the target's logit: at most one rounding of it, plus fp32 sums.
    atol = 1e-4 if dtype == torch.float32 else 2 * ulp * float(full64.abs().max())
    torch.testing.assert_close(got.logp, want.logp, rtol=0, atol=atol)


@needs_triton
def test_triton_nd_hidden_strided_and_op():
    """A [B, T, D] hidden view with a non-unit inner stride (every other feature of a wider
    tensor), the torch.library op called directly, and one split holding the whole vocabulary."""
    wide, weight, bias = int_inputs(2 * 30, 2 * 12, V_TRITON, torch.float32, seed=23)
    weight = weight[:, :12].contiguous()
    hidden = wide.reshape(2, 30, 24)[..., ::2]           # [2, 30, 12], stride 2 along D
    targets = torch.randint(0, V_TRITON, (2, 30), generator=torch.Generator().manual_seed(24))
    want = full_logits_stats(F.linear(hidden, weight, bias), targets, "triton")
    wide, weight, bias, targets = on(device_for("triton"), wide, weight, bias, targets)
    hidden = wide.reshape(2, 30, 24)[..., ::2]           # the same view, where triton runs
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend="triton", block_size=4096)
    assert_stats_equal(got, want, "triton")
    op = lts.linear_token_stats_op(hidden, weight, bias, targets, -100, V_TRITON, 1024, "triton")
    assert op[0].shape == (2, 30) and int(op[3]) == -1
    assert_stats_equal(type(got)(*op[:3]), want, "triton")


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    """"auto" on CUDA tensors: the fused Triton kernel where Triton can run, else the reference."""
    from types import SimpleNamespace

    from rankops.ops import common
    cuda_hidden = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    monkeypatch.setattr(common, "_triton_usable", lambda: True)
    assert common._resolve_linear_backend("auto", cuda_hidden) == "triton"
    monkeypatch.setattr(common, "_triton_usable", lambda: False)
    assert common._resolve_linear_backend("auto", cuda_hidden) == "torch"
    assert common._resolve_linear_backend("auto", SimpleNamespace(device=torch.device("cpu"),
                                                                  dtype=torch.float32)) in ("cpu", "torch")


@needs_triton
def test_triton_memory_is_o_n(monkeypatch):
    """No tensor near N * V: the largest the Triton path allocates is per (row, split). On a GPU,
    device memory: everything the call holds at its peak together."""
    from torch.profiler import ProfilerActivity, profile
    n = 1024
    dev = device_for("triton")
    hidden, weight, bias = on(dev, *int_inputs(n, 8, V_TRITON, torch.float32, seed=25))
    targets = torch.randint(0, V_TRITON, (n,)).to(dev)
    n_splits = -(-V_TRITON // 1024)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)  # the inputs
        rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend="triton", block_size=1024)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        # Five partials per (row, split) (32 bytes) and the per-row outputs (under 32 bytes a
        # row): at most 64 bytes per (row, split) in all.
        assert 0 < peak <= 64 * n * n_splits <= n * V_TRITON * 4 / 20, peak
        return
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend="triton", block_size=1024)
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    # int64 partials per (row, split), or a host copy of an input (the interpreter's).
    assert 0 < largest <= max(8 * n * n_splits, weight.numel() * 4) <= n * V_TRITON * 4 / 20, largest


@pytest.mark.slow  # ~2.1e9 logits on the CPU: about a minute on 2 cores
def test_cpu_more_than_2_31_logits():
    """N * V > 2^31 on the cpu backend, checked against counting by hand: D = 2 and the weight's
    rows take 25 distinct integer values, so each row's rank, ties and logsumexp follow from 25
    logits and how often each occurs (float64), without any [N, V] tensor."""
    n, v = 2 ** 15 + 3, 2 ** 16 + 5                      # n * v = 2,147,844,111 > 2^31
    g = torch.Generator().manual_seed(26)
    kinds = torch.tensor([[a, b] for a in range(-2, 3) for b in range(-2, 3)], dtype=torch.float32)
    kind = torch.randint(0, len(kinds), (v,), generator=g)
    weight = kinds[kind]                                 # [V, 2]
    hidden = torch.randint(-3, 4, (n, 2), generator=g).float()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[-4:] = torch.tensor([0, v - 1, -100, v // 2])  # rows past 2^31 / V, the last ones
    got = rankops.linear_token_stats(hidden, weight, targets, backend="cpu")
    kept = targets != -100
    per_kind = torch.bincount(kind, minlength=len(kinds)).double()       # [25]
    z = hidden.double() @ kinds.double().T                                # [N, 25]: every logit value
    z_t = z.gather(1, kind[targets.clamp(min=0)][:, None])
    rank = ((z > z_t) * per_kind).sum(1).long()
    ties = ((z == z_t) * per_kind).sum(1).long() - 1
    logp = (z_t[:, 0] - torch.logsumexp(z + per_kind.log(), 1))
    assert torch.equal(got.rank[kept], rank[kept]) and torch.equal(got.ties[kept], ties[kept])
    assert (got.rank[~kept] == -1).all()
    # fp32 logsumexp of 65541 terms against float64: relative error of the sum well under 1e-5.
    torch.testing.assert_close(got.logp[kept].double(), logp[kept], rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_gpu_beyond_2_31(dtype):
    """On a GPU, the compiled kernel (tensor cores for 16-bit inputs): N * V > 2^31 logits with
    integer inputs (|logit| <= 16 + 1, exact in every dtype and any summation order), checked
    against token_stats on F.linear a chunk of rows at a time; "auto" picks it for CUDA tensors."""
    n, d, v = 2 ** 15 + 3, 16, 2 ** 16 + 5
    g = torch.Generator(device="cuda").manual_seed(27)
    hidden = torch.randint(-1, 2, (n, d), generator=g, device="cuda").to(dtype)
    weight = torch.randint(-1, 2, (v, d), generator=g, device="cuda").to(dtype)
    bias = torch.randint(-1, 2, (v,), generator=g, device="cuda").to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device="cuda")
    targets[-3:] = torch.tensor([0, v - 1, -100])
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias)
    for c0 in range(0, n, 4096):
        rows = slice(c0, min(c0 + 4096, n))
        want = rankops.token_stats(F.linear(hidden[rows], weight, bias), targets[rows])
        assert torch.equal(got.rank[rows], want.rank) and torch.equal(got.ties[rows], want.ties)
        torch.testing.assert_close(got.logp[rows], want.logp, rtol=LOGP_RTOL, atol=LOGP_ATOL)
