"""linear_token_stats: token_stats of hidden @ weight.T + bias without the [N, V] logits.

Integer-valued inputs make every product and sum exact (|logit| < 256 is exact in bf16 too), so
the block path's logits equal F.linear's and every result must equal token_stats on the full
logits bit for bit, on the same backend. Random inputs agree within rounding."""
import pytest
import torch
import torch.nn.functional as F

import rankops
from rankops.ops import linear_token_stats as lts

HOST = [b for b in ("cpu", "torch") if b in rankops.available_backends()]
SLICE = 16384
V = 40000  # not a multiple of any block size used here: a short last block


def int_inputs(n, d, v, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    weight = torch.randint(-3, 4, (v, d), generator=g).to(dtype)
    b = torch.randint(-3, 4, (v,), generator=g).to(dtype) if bias else None
    return hidden, weight, b


def boundary_targets(n, v, seed=1):
    """Random targets with the block and slice boundaries among them, and two ignored rows."""
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[:4] = torch.tensor([0, SLICE - 1, SLICE, v - 1])
    t[7] = t[11] = -100
    return t


def assert_same(got, want):
    for name, a, b in zip(("rank", "ties", "logp"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_integer_inputs_equal_full_logits(backend, dtype, with_bias):
    hidden, weight, bias = int_inputs(300, 16, V, dtype, bias=with_bias)
    targets = boundary_targets(300, V)
    want = rankops.token_stats(F.linear(hidden, weight, bias), targets, backend=backend)
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=backend,
                                     block_size=SLICE)
    assert_same(got, want)


@pytest.mark.parametrize("backend,block_size", [("cpu", SLICE), ("cpu", 2 * SLICE), ("cpu", 3 * SLICE),
                                                ("cpu", 4 * SLICE), ("torch", 1000), ("torch", 7777),
                                                ("torch", 65536)])
def test_block_sizes(backend, block_size, monkeypatch):
    """Blocks that do not divide V, one block wider than V, and (a small logits buffer) many row
    chunks per target block."""
    if backend not in HOST:
        pytest.skip(f"no {backend} backend")
    monkeypatch.setattr(lts, "BUFFER_ELEMENTS", 5 * block_size)      # 5 rows a chunk
    monkeypatch.setattr(lts, "REFERENCE_ELEMENTS", 5 * V)
    hidden, weight, bias = int_inputs(64, 8, V, torch.float32, seed=2)
    targets = boundary_targets(64, V, seed=3)
    want = rankops.token_stats(F.linear(hidden, weight, bias), targets, backend=backend)
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=backend,
                                     block_size=block_size)
    assert_same(got, want)


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
    for backend in HOST:
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
    hidden, weight, bias = int_inputs(100, 8, V, torch.float32, seed=5)
    padded = torch.cat([weight, torch.full((64, 8), 3.0)])
    padded_bias = torch.cat([bias, torch.full((64,), 3.0)])
    targets = boundary_targets(100, V, seed=6)
    want = rankops.token_stats(F.linear(hidden, weight, bias), targets, backend=backend)
    got = rankops.linear_token_stats(hidden, padded, targets, bias=padded_bias, vocab_size=V,
                                     backend=backend, block_size=SLICE)
    assert_same(got, want)
    with pytest.raises(ValueError, match="targets"):  # a target in the padding is out of range
        rankops.linear_token_stats(hidden, padded, torch.full((100,), V + 1), bias=padded_bias,
                                   vocab_size=V, backend=backend)


@pytest.mark.parametrize("backend", HOST)
def test_tied_weights_and_nd_hidden(backend):
    """The embedding's own weight as the output layer (a Parameter that requires grad), and
    hidden states [B, T, D]: results of the targets' shape, equal to the flat call."""
    emb = torch.nn.Embedding(V, 8)
    with torch.no_grad():
        emb.weight.copy_(torch.randint(-3, 4, (V, 8)).float())
    ids = torch.randint(0, V, (3, 50))
    hidden = emb(ids).detach() + torch.randint(-1, 2, (3, 50, 8)).float()  # [B, T, D]
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    got = rankops.linear_token_stats(hidden, emb.weight, targets, backend=backend)
    assert got.rank.shape == got.logp.shape == (3, 50)
    assert not got.logp.requires_grad
    want = rankops.token_stats(F.linear(hidden, emb.weight.detach()), targets, backend=backend)
    assert_same(got, want)
    flat = rankops.linear_token_stats(hidden.reshape(-1, 8), emb.weight, targets.reshape(-1), backend=backend)
    assert_same([x.reshape(-1) for x in got], flat)


@pytest.mark.parametrize("backend", HOST)
def test_ignore_index(backend):
    hidden, weight, bias = int_inputs(40, 8, 3000, torch.float32, seed=7)
    targets = torch.randint(0, 3000, (40,))
    targets[::3] = 2999  # ignore_index may be any int, a valid class index included
    got = rankops.linear_token_stats(hidden, weight, targets, bias=bias, ignore_index=2999, backend=backend)
    want = rankops.token_stats(F.linear(hidden, weight, bias), targets, ignore_index=2999, backend=backend)
    assert_same(got, want)
    assert (got.rank[::3] == -1).all() and (got.logp[::3] == 0).all() and (got.ties[::3] == 0).all()
    none = rankops.linear_token_stats(hidden, weight, torch.full((40,), -100), backend=backend)
    assert (none.rank == -1).all() and (none.logp == 0).all()


@pytest.mark.parametrize("backend", HOST)
def test_nonfinite_logits(backend):
    """Non-finite bias entries make whole columns NaN or +-inf: raised by default, and with
    check_finite=False the same IEEE results as token_stats on the full logits."""
    hidden, weight, bias = int_inputs(60, 8, V, torch.float32, seed=8)
    targets = boundary_targets(60, V, seed=9)
    for cols, value in (([5], float("inf")), ([20000], float("nan")), ([5, 30000], float("inf")),
                        (list(range(0, V, 2)), float("-inf"))):
        b = bias.clone()
        b[cols] = value
        if value == float("inf") and len(cols) == 2:
            b[39000] = float("nan")  # +inf and NaN in different blocks: NaN wins
        with pytest.raises(ValueError, match="non-finite"):
            rankops.linear_token_stats(hidden, weight, targets, bias=b, backend=backend, block_size=SLICE)
        want = rankops.token_stats(F.linear(hidden, weight, b), targets, backend=backend, check_finite=False)
        got = rankops.linear_token_stats(hidden, weight, targets, bias=b, backend=backend,
                                         check_finite=False, block_size=SLICE)
        assert_same(got, want)


@pytest.mark.parametrize("backend", HOST)
def test_update_linear_equals_update(backend):
    hidden, weight, bias = int_inputs(200, 8, V + 10, torch.bfloat16, seed=10)
    targets = boundary_targets(200, V, seed=11)
    a, b = rankops.RankAccumulator(V), rankops.RankAccumulator(V)
    a.update(F.linear(hidden, weight, bias), targets, backend=backend)
    b.update_linear(hidden, weight, targets, bias=bias, backend=backend)
    assert torch.equal(a.stats, b.stats) and int(a.n_tied) == int(b.n_tied) > 0
    before = b.stats.clone()
    with pytest.raises(ValueError, match="targets"):
        b.update_linear(hidden, weight, torch.full((200,), V + 5), backend=backend)
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
    (dict(backend="triton"), ValueError, "triton"),
    (dict(backend="cuda"), ValueError, "cuda"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(hidden=torch.zeros(0, 8), targets=torch.zeros(0, dtype=torch.int64)), ValueError, "empty"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(100, 8), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(error, match=match):
        rankops.linear_token_stats(hidden, weight, targets, **args)


def test_auto_backend_and_the_op():
    """auto picks the C++ kernel for CPU tensors; the torch.library op gives the same results."""
    hidden, weight, bias = int_inputs(32, 8, 3000, torch.float32, seed=13)
    targets = torch.randint(0, 3000, (32,))
    want = rankops.linear_token_stats(hidden, weight, targets, bias=bias, backend=HOST[0])
    assert_same(rankops.linear_token_stats(hidden, weight, targets, bias=bias), want)
    got = lts.linear_token_stats_op(hidden, weight, bias, targets, -100, 3000, 32768, HOST[0])
    assert_same(got[:3], want)
