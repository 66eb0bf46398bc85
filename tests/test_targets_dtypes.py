"""Targets of every integer dtype torch has, on every backend and every public path.

Targets used to be compared with ignore_index in their own dtype, where -100 wraps (to 156 for
uint8): a uint8 target of 156 was dropped as ignored, int16 targets were rejected for any
V > 32767, int8/uint8 targets >= 44 with V = 300, and the unsigned 16/32/64-bit dtypes raised
NotImplementedError. Every path now converts the targets to int64 before looking at them, so a
narrow dtype gives exactly what the same values give as int64.
"""
import pytest
import torch
import torch.distributed as td

import rankops

INT_DTYPES = [getattr(torch, name) for name in ("int8", "uint8", "int16", "uint16", "int32",
                                                 "uint32", "int64", "uint64") if hasattr(torch, name)]


def _case(dtype, n_vocab=300, device="cpu"):
    """(logits, int64 targets, the same targets in dtype), on device: the values that used to
    fail, where the dtype can hold them (156 = -100 wrapped to uint8; 44..127 for int8; 30000 for
    V > 32767), and ignored rows where the dtype can hold -100."""
    info = torch.iinfo(dtype)
    wanted = [156, 0, 44, 100, 127, 200, 255, 299, 30000, 39999, n_vocab - 1, 7, -100, 5]
    values = [v for v in wanted if info.min <= v <= info.max and (v < n_vocab or v == -100)]
    g = torch.Generator().manual_seed(len(values) + n_vocab)
    logits = torch.randn(len(values), n_vocab, generator=g)
    t64 = torch.tensor(values, dtype=torch.int64)
    return logits.to(device), t64.to(device), t64.to(dtype).to(device)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [300, 40000])
def test_token_stats_every_integer_dtype(backend, device, dtype, n_vocab):
    logits, t64, t = _case(dtype, n_vocab, device)
    want = rankops.token_stats(logits, t64, backend=backend)
    got = rankops.token_stats(logits, t, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if 156 in t64.tolist():  # -100 wrapped: a real target, kept
        assert int(got.rank[t64.tolist().index(156)]) >= 0
    assert int((got.rank < 0).sum()) == int((t64 == -100).sum())


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_out_of_range_narrow_target_raises(backend, device, dtype):
    logits, t64, t = _case(dtype, 300, device)
    bad = t.clone()
    bad[1] = 255 if torch.iinfo(dtype).max >= 255 else 127  # >= V = 100
    with pytest.raises(ValueError, match="targets must lie in"):
        rankops.token_stats(logits[:, :100], bad, backend=backend)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_accumulator_update_every_integer_dtype(backend, device, dtype):
    logits, t64, t = _case(dtype, 300, device)
    want = rankops.RankAccumulator(300, device=device)
    want.update(logits, t64, backend=backend)
    got = rankops.RankAccumulator(300, device=device)
    got.update(logits, t, backend=backend)
    assert torch.equal(got.stats, want.stats)
    assert int(got.n_tied) == int(want.n_tied)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_update_stats_every_integer_dtype(dtype):
    logits, t64, _ = _case(torch.int64, 300)
    s = rankops.token_stats(logits, t64, backend="torch")
    info = torch.iinfo(dtype)
    keep = (s.rank >= info.min) & (s.rank <= info.max) & (s.rank + s.ties <= info.max)
    rank, ties, logp = s.rank[keep], s.ties[keep], s.logp[keep]
    want = rankops.RankAccumulator(300)
    want.update_stats(rank, logp, ties=ties)
    got = rankops.RankAccumulator(300)
    got.update_stats(rank.to(dtype), logp, ties=ties.to(dtype))
    assert torch.equal(got.stats, want.stats)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_compensated_cross_entropy_every_integer_dtype(backend, device, dtype):
    logits, t64, t = _case(dtype, 300, device)
    results = []
    for targets in (t64, t):
        z = logits.clone().requires_grad_(True)
        loss = rankops.compensated_cross_entropy(z, targets, 0.3, backend=backend)
        loss.backward()
        results.append((loss.detach(), z.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    if td.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    init = tmp_path_factory.mktemp("pg") / "init"
    td.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield
    finally:
        td.destroy_process_group()


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_vocab_parallel_every_integer_dtype(one_process_group, backend, device, dtype):
    logits, t64, t = _case(dtype, 300, device)
    want = rankops.token_stats_vocab_parallel(logits, t64, vocab_start=0, backend=backend)
    got = rankops.token_stats_vocab_parallel(logits, t, vocab_start=0, backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert int((got.rank < 0).sum()) == int((t64 == -100).sum())
