"""rankops.RankAccumulator: per-rank sufficient statistics, additive and deterministic.

The accumulator must hold exactly what the per-token statistics say (integer counts exact,
logp sums to their fixed-point quantum and float64 rounding), whatever the backend, the
batching, the merge order or the thread count, and must stay untouched by a call that fails.
"""
import io

import numpy as np
import pytest
import torch

import rankops
from conftest import runs_on_host

# Backends that take CPU tensors: cpu, torch, and triton under its interpreter (conftest.py
# turns that on without a GPU). GPU tensors are covered in tests/test_gpu.py.
BACKENDS = [b for b in rankops.available_backends() if runs_on_host(b)]
HAS_CPU = "cpu" in BACKENDS
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="CPU kernel not built")
ARRAYS = ("count", "sum_logp", "count_pessimistic", "sum_logp_pessimistic")

# Per-bin sums of at most a few hundred same-sign float64 terms, regrouped (chunks, merges,
# bincount vs a serial loop): the reassociation error is <= n * 2^-53 relative ~ 1e-13.
SUM_RTOL = 1e-12
# docs/DESIGN.md allows the per-rank sums in "exact fixed point"; rankops keeps 40 fractional bits,
# so each token's logp may be rounded by half a quantum, 2^-41 (exactly representable fp32
# values of magnitude >= 2^-16 are not rounded at all).
HALF_QUANTUM = 2.0 ** -41
# Decomposition components from such sums, relative to max(|CE|, |EE| + |SA| + |Conf|); the
# reasoning is in tests/test_decompose.py.
REL = 1e-12

# (backend, dtype) pairs each backend accepts: the CPU kernel reads fp32/bf16/fp16, the torch
# reference also float64.
BACKEND_DTYPES = [(b, dt) for b in BACKENDS
                  for dt in ((torch.float32, torch.bfloat16, torch.float16) if b != "torch"
                             else (torch.float32, torch.bfloat16, torch.float64))]


def dtype_id(dt):
    return str(dt).replace("torch.", "")


def make_batch(seed, n_rows, V, dtype=torch.float32, ignore_frac=0.1, scale=2.0):
    """logits [n_rows, V] and targets [n_rows] with about ignore_frac of them -100.

    Targets are drawn half from the top few logits and half uniformly, so ranks spread from 0
    to ~V (a realistic mix of easy and hard tokens)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    top = logits.float().topk(min(3, V), dim=1).indices
    pick = torch.randint(0, top.shape[1], (n_rows,), generator=g)
    targets = torch.where(torch.rand(n_rows, generator=g) < 0.5,
                          top[torch.arange(n_rows), pick],
                          torch.randint(0, V, (n_rows,), generator=g))
    targets[torch.rand(n_rows, generator=g) < ignore_frac] = -100
    return logits, targets


def snapshot(acc):
    state = {name: getattr(acc, name).clone() for name in ARRAYS}
    state.update(n_tied=int(acc.n_tied), n_tokens=acc.n_tokens, ties_known=acc.ties_known)
    return state


def assert_identical(a, b):
    """Bit-identical accumulators."""
    for name in ARRAYS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert int(a.n_tied) == int(b.n_tied)
    assert a.ties_known == b.ties_known


def assert_sums_close(got, want, count):
    """Per-rank sums [V]: float64 reassociation plus up to half a fixed-point quantum per token."""
    bound = SUM_RTOL * want.abs() + count.to(torch.float64) * HALF_QUANTUM
    excess = (got - want).abs() - bound
    assert bool((excess <= 0).all()), f"max excess {float(excess.max()):.3g}"


def assert_same_stats(a, b):
    """Counts exactly equal; sums of (possibly different roundings of) the same logp."""
    assert a.vocab_size == b.vocab_size
    for name in ("count", "count_pessimistic"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # Two roundings of one logp can differ by a whole quantum: twice the half-quantum bound.
    assert_sums_close(a.sum_logp, b.sum_logp, 2 * b.count)
    assert_sums_close(a.sum_logp_pessimistic, b.sum_logp_pessimistic, 2 * b.count_pessimistic)
    assert int(a.n_tied) == int(b.n_tied)
    assert a.n_tokens == b.n_tokens


def assert_decomp_close(d1, d2):
    # Per-rank mean logp differing by <= 2^-40 (fixed-point rounding) moves CE and Conf by at
    # most that and SA by twice that, 9e-13: inside REL * scale for these data (scale > 1).
    assert d1.n_tokens == d2.n_tokens
    assert d1.ties == d2.ties
    np.testing.assert_array_equal(d1.ranks, d2.ranks)
    np.testing.assert_array_equal(d1.counts, d2.counts)
    scale = max(abs(d2.cross_entropy),
                abs(d2.error_entropy) + abs(d2.self_alignment) + abs(d2.confidence))
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert abs(getattr(d1, name) - getattr(d2, name)) <= REL * scale, name


def bincount_stats(rank, logp, V):
    """count [V] int64 and sum_logp [V] float64 from per-token values (rank -1 dropped)."""
    keep = rank >= 0
    r = rank[keep]
    return (torch.bincount(r, minlength=V),
            torch.bincount(r, weights=logp[keep].to(torch.float64), minlength=V))


# --------------------------------------------------------------------------------------------
# update == the per-token statistics, for every backend
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES,
                         ids=[f"{b}-{dtype_id(dt)}" for b, dt in BACKEND_DTYPES])
def test_update_equals_token_stats(backend, dtype):
    V = 301
    logits, targets = make_batch(0, 200, V, dtype)
    acc = rankops.RankAccumulator(V)
    acc.update(logits, targets, backend=backend)
    stats = rankops.token_stats(logits, targets, backend=backend)
    keep = targets != -100

    count, sum_logp = bincount_stats(stats.rank, stats.logp, V)
    count_p, sum_logp_p = bincount_stats(torch.where(keep, stats.rank + stats.ties, -1),
                                         stats.logp, V)
    assert torch.equal(acc.count, count)
    assert torch.equal(acc.count_pessimistic, count_p)
    assert_sums_close(acc.sum_logp, sum_logp, count)
    assert_sums_close(acc.sum_logp_pessimistic, sum_logp_p, count_p)
    assert acc.n_tokens == int(keep.sum())
    assert int(acc.n_tied) == int((stats.ties[keep] > 0).sum())

    assert_decomp_close(acc.decompose(), rankops.decompose(stats.rank, stats.logp))
    assert_decomp_close(acc.decompose("pessimistic"),
                        rankops.decompose(torch.where(keep, stats.rank + stats.ties, -1),
                                          stats.logp, ties="pessimistic"))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES,
                         ids=[f"{b}-{dtype_id(dt)}" for b, dt in BACKEND_DTYPES])
def test_chunks_and_merges_equal_one_pass(backend, dtype):
    V = 257
    logits, targets = make_batch(1, 150, V, dtype)
    whole = rankops.RankAccumulator(V)
    whole.update(logits, targets, backend=backend)

    parts = []
    for lo, hi in ((0, 7), (7, 101), (101, 150)):            # three uneven pieces
        acc = rankops.RankAccumulator(V)
        acc.update(logits[lo:hi], targets[lo:hi], backend=backend)
        parts.append(acc)
    before = [snapshot(p) for p in parts]

    merged = parts[0].copy().merge(parts[1]).merge(parts[2])
    added = parts[0] + parts[1] + parts[2]
    inplace = rankops.RankAccumulator(V)
    same = inplace
    inplace += parts[2]                                       # a different order, too
    inplace += parts[0]
    inplace += parts[1]
    assert inplace is same                                    # += works in place

    # The sums are exact fixed point (rankops/accumulate.py), so merging in any order is
    # bit-identical; and the CPU kernel computes each row on its own, so the chunks hold the
    # same per-token values as the whole batch and even the one pass matches to the bit.
    assert_identical(merged, added)
    assert_identical(merged, inplace)
    if backend == "cpu":
        assert_identical(merged, whole)
    for acc in (merged, added, inplace):
        assert_same_stats(acc, whole)
        assert_decomp_close(acc.decompose(), whole.decompose())
        assert_decomp_close(acc.decompose("pessimistic"), whole.decompose("pessimistic"))
        assert acc.tie_rate == whole.tie_rate                 # a ratio of equal integers
    # copy() and + leave their operands alone.
    for p, b in zip(parts, before):
        assert snapshot(p)["n_tokens"] == b["n_tokens"]
        for name in ARRAYS:
            assert torch.equal(getattr(p, name), b[name])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_cpu_accumulate_path_equals_update_stats(dtype, cpu_isa):
    # update(backend="cpu") takes the fused C++ accumulate path; update_stats fed the CPU
    # kernel's per-token output takes the Python bincount path. Same per-token values, for
    # every compiled instruction set (cpu_isa, tests/conftest.py).
    V = 1000
    logits, targets = make_batch(2, 300, V, dtype)
    fused = rankops.RankAccumulator(V)
    fused.update(logits, targets, backend="cpu")
    stats = rankops.token_stats(logits, targets, backend="cpu")
    via_stats = rankops.RankAccumulator(V)
    via_stats.update_stats(stats.rank, stats.logp, ties=stats.ties)
    assert_same_stats(fused, via_stats)
    assert fused.tie_rate == via_stats.tie_rate


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_same_input_twice_is_bit_identical(backend):
    V = 509
    batches = [make_batch(seed, 64, V) for seed in (3, 4, 5)]
    accs = []
    for _ in range(2):
        acc = rankops.RankAccumulator(V)
        for logits, targets in batches:
            acc.update(logits, targets, backend=backend)
        accs.append(acc)
    assert_identical(accs[0], accs[1])


def run_with_threads(n_threads, fn):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        return fn()
    finally:
        torch.set_num_threads(saved)


@needs_cpu
def test_cpu_thread_count_independent_many_rows():
    # 64 rows x 3001 columns is above the kernel's threshold for going parallel (2^15 logits),
    # and with at least as many rows as threads each row is computed whole by one thread.
    V = 3001
    batches = [make_batch(seed, 64, V, dtype) for seed, dtype in
               ((6, torch.float32), (7, torch.bfloat16), (8, torch.float16))]

    def run():
        acc = rankops.RankAccumulator(V)
        for logits, targets in batches:
            acc.update(logits, targets, backend="cpu")
        return acc

    assert_identical(run_with_threads(1, run), run_with_threads(2, run))


@needs_cpu
def test_cpu_thread_count_independent_one_row_per_update():
    # One row per call (batch-1 scoring) over GPT-2's vocabulary: with 2 threads the row is split.
    V = 50257
    logits, targets = make_batch(9, 256, V, scale=4.0, ignore_frac=0.0)

    def run():
        acc = rankops.RankAccumulator(V)
        for i in range(logits.shape[0]):
            acc.update(logits[i:i + 1], targets[i:i + 1], backend="cpu")
        return acc

    assert_identical(run_with_threads(1, run), run_with_threads(2, run))


# --------------------------------------------------------------------------------------------
# Ties: the pessimistic decomposition
# --------------------------------------------------------------------------------------------

def independent_ties(logits, targets):
    """#{v != t : z_v == z_t} per kept row, in numpy on the exactly upcast values."""
    keep = (targets != -100).numpy()
    z = logits.float().numpy()[keep]
    t = targets.numpy()[keep]
    z_t = z[np.arange(z.shape[0]), t]
    return (z == z_t[:, None]).sum(axis=1) - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_pessimistic_with_bf16_ties(backend):
    # bf16 keeps 8 significant bits: 1000 values from N(0, 1) share ~1000/256-per-octave
    # levels, so most targets tie with some other logit.
    V = 1000
    logits, targets = make_batch(10, 300, V, torch.bfloat16, scale=1.0)
    ties_np = independent_ties(logits, targets)
    assert (ties_np > 0).mean() > 0.3                 # the data really is tie-heavy

    acc = rankops.RankAccumulator(V)
    acc.update(logits, targets, backend=backend)
    stats = rankops.token_stats(logits, targets, backend=backend)
    keep = targets != -100
    np.testing.assert_array_equal(stats.ties[keep].numpy(), ties_np)

    strict = acc.decompose("strict")
    pess = acc.decompose("pessimistic")
    assert pess.ties == "pessimistic" and strict.ties == "strict"
    assert_decomp_close(pess, rankops.decompose(torch.where(keep, stats.rank + stats.ties, -1),
                                                stats.logp, ties="pessimistic"))
    # The same tokens with the same logp: CE agrees; the rank histogram (hence EE) does not.
    assert pess.cross_entropy == pytest.approx(strict.cross_entropy, rel=1e-14)
    assert pess.n_tokens == strict.n_tokens
    assert not np.array_equal(pess.ranks, strict.ranks) or not np.array_equal(pess.counts,
                                                                             strict.counts)
    assert pess.error_entropy != strict.error_entropy
    assert pess.mean_reciprocal_rank < strict.mean_reciprocal_rank   # ranks only go up
    # tie_rate: the fraction of kept tokens with at least one tie, from integers.
    assert int(acc.n_tied) == int((ties_np > 0).sum())
    assert acc.tie_rate == int((ties_np > 0).sum()) / int(keep.sum())


def test_no_ties_strict_equals_pessimistic():
    # Distinct logits in every row: rank + ties == rank, the two decompositions coincide.
    V = 64
    g = torch.Generator().manual_seed(11)
    logits = torch.stack([torch.randperm(V, generator=g) for _ in range(40)]).float()
    targets = torch.randint(0, V, (40,), generator=g)
    acc = rankops.RankAccumulator(V)
    acc.update(logits, targets)
    assert acc.tie_rate == 0.0
    assert torch.equal(acc.count, acc.count_pessimistic)
    assert torch.equal(acc.sum_logp, acc.sum_logp_pessimistic)


# --------------------------------------------------------------------------------------------
# vocab_size truncation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_truncation(backend):
    # An odd V padded like Pythia's output layer. The padding holds values that would dominate
    # every row if read (+1e4) and a NaN that would trip the finite check if read.
    V, pad = 37, 11
    logits, targets = make_batch(12, 80, V)
    padded = torch.cat([logits, torch.full((80, pad), 1e4)], dim=1)
    padded[5, V + 3] = float("nan")
    truncated = rankops.RankAccumulator(V)
    truncated.update(padded, targets, backend=backend)
    plain = rankops.RankAccumulator(V)
    plain.update(logits.contiguous(), targets, backend=backend)
    assert_same_stats(truncated, plain)
    assert truncated.n_tokens == int((targets != -100).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_bad_widths_and_targets(backend):
    V = 37
    logits, targets = make_batch(13, 20, V)
    acc = rankops.RankAccumulator(V + 1)
    with pytest.raises(ValueError, match="columns"):
        acc.update(logits, targets, backend=backend)          # narrower than vocab_size
    assert acc.n_tokens == 0
    acc = rankops.RankAccumulator(V - 5)
    bad = targets.clone()
    bad[3] = V - 2                                            # a padded column
    with pytest.raises(ValueError, match="targets must lie in"):
        acc.update(logits, bad, backend=backend)
    assert acc.n_tokens == 0


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

def filled_accumulator(V=101, seed=14):
    acc = rankops.RankAccumulator(V)
    acc.update(*make_batch(seed, 120, V, torch.bfloat16))
    return acc


def test_state_dict_round_trip():
    acc = filled_accumulator()
    state = acc.state_dict()
    restored = rankops.RankAccumulator(acc.vocab_size)
    restored.load_state_dict(state)
    assert_identical(restored, acc)
    assert restored.n_tokens == acc.n_tokens and restored.tie_rate == acc.tie_rate

    # Through torch.save / torch.load (the default weights_only loader must accept it).
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    reloaded = rankops.RankAccumulator(acc.vocab_size)
    reloaded.load_state_dict(torch.load(buf))
    assert_identical(reloaded, acc)
    assert_decomp_close(reloaded.decompose("pessimistic"), acc.decompose("pessimistic"))

    # state_dict is a snapshot, and the loaded accumulator owns its arrays: changing the
    # source or the dict afterwards changes neither.
    frozen = snapshot(restored)
    acc.update(*make_batch(15, 10, acc.vocab_size))
    assert restored.n_tokens == frozen["n_tokens"]
    for value in state.values():
        if isinstance(value, torch.Tensor):
            value.add_(1000)
    after = snapshot(restored)
    for name in ARRAYS:
        assert torch.equal(after[name], frozen[name]), name
    # A second round trip of the restored accumulator reproduces it again.
    again = rankops.RankAccumulator(acc.vocab_size)
    again.load_state_dict(restored.state_dict())
    assert_identical(again, restored)


def test_state_dict_keeps_unknown_ties():
    acc = rankops.RankAccumulator(10)
    acc.update_stats(torch.tensor([0, 1, 1]), torch.tensor([-0.1, -1.0, -2.0]))
    restored = rankops.RankAccumulator(10)
    restored.load_state_dict(acc.state_dict())
    assert restored.ties_known is False
    with pytest.raises(ValueError, match="tie"):
        restored.decompose("pessimistic")


def test_load_state_dict_errors_leave_accumulator_unchanged():
    acc = filled_accumulator()
    good = acc.state_dict()
    target = filled_accumulator(seed=16)
    before = snapshot(target)

    wrong_vocab = rankops.RankAccumulator(50)
    wrong_vocab.update(*make_batch(17, 30, 50))
    cases = [("vocab_size", wrong_vocab.state_dict(), ValueError, "vocab_size"),
             ("format", {**good, "format": 99}, ValueError, "format"),
             ("not_dict", [1, 2], TypeError, "dict")]
    # Whatever arrays the state holds: a missing one, one of the wrong dtype, one of the wrong
    # shape is rejected, naming it. (ties_known is optional: it defaults to True.)
    for key in ("format", "vocab_size"):
        cases.append((f"missing {key}", {k: v for k, v in good.items() if k != key},
                      ValueError, key))
    array_keys = [k for k, v in good.items() if isinstance(v, torch.Tensor) and v.dim() >= 1]
    assert array_keys
    for key in array_keys:
        x = good[key]
        wrong_dtype = x.double() if not x.is_floating_point() else x.float()
        cases += [(f"missing {key}", {k: v for k, v in good.items() if k != key}, ValueError, key),
                  (f"dtype {key}", {**good, key: wrong_dtype}, ValueError, key),
                  (f"shape {key}", {**good, key: x[..., :-1]}, ValueError, key)]
    for name, state, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            target.load_state_dict(state)
        after = snapshot(target)
        for key in ARRAYS:
            assert torch.equal(after[key], before[key]), (name, key)
        assert after["n_tied"] == before["n_tied"], name
        assert after["ties_known"] == before["ties_known"], name


def test_update_stats_without_ties():
    acc = rankops.RankAccumulator(10)
    acc.update_stats(torch.tensor([0, 2, 2, -1]), torch.tensor([-0.5, -1.0, -3.0, 0.0]))
    assert acc.n_tokens == 3
    assert acc.count.tolist() == [1, 0, 2] + [0] * 7
    assert acc.sum_logp[:3].tolist() == [-0.5, 0.0, -4.0]       # exact in binary
    with pytest.raises(ValueError, match="tie"):
        acc.decompose("pessimistic")
    with pytest.raises(ValueError, match="tie"):
        acc.tie_rate
    # Strict still works: 1 token at rank 0, 2 at rank 2.
    d = acc.decompose()
    assert d.counts.tolist() == [1, 2]
    # Merging an accumulator without ties makes the result's tie counts unknown too.
    known = rankops.RankAccumulator(10)
    known.update(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
    known.merge(acc)
    with pytest.raises(ValueError, match="tie"):
        known.decompose("pessimistic")


def test_update_stats_bad_input():
    acc = rankops.RankAccumulator(10)
    with pytest.raises(ValueError, match="rank must lie in"):
        acc.update_stats(torch.tensor([10]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="rank must lie in"):
        acc.update_stats(torch.tensor([-2]), torch.tensor([-1.0]))
    with pytest.raises(TypeError, match="rank"):
        acc.update_stats(torch.tensor([1.0]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="shape"):
        acc.update_stats(torch.tensor([1, 2]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        acc.update_stats(torch.tensor([1]), torch.tensor([float("nan")]))
    assert acc.n_tokens == 0
    assert all(int(getattr(acc, name).abs().sum()) == 0 for name in ARRAYS)


@pytest.mark.parametrize("ties", [[2, 0], [0, -1]], ids=["rank+ties>=V", "negative"])
def test_update_stats_bad_ties_leave_accumulator_unchanged(ties):
    # A rejected call must not be half applied (strict arrays updated, pessimistic not).
    acc = rankops.RankAccumulator(10)
    acc.update_stats(torch.tensor([1, 3]), torch.tensor([-1.0, -2.0]), ties=torch.tensor([0, 1]))
    before = snapshot(acc)
    with pytest.raises(ValueError, match="ties"):
        acc.update_stats(torch.tensor([8, 2]), torch.tensor([-1.0, -0.5]), ties=torch.tensor(ties))
    after = snapshot(acc)
    assert after["n_tokens"] == before["n_tokens"]
    for name in ARRAYS:
        assert torch.equal(after[name], before[name]), name


def test_merge_errors():
    acc = rankops.RankAccumulator(10)
    with pytest.raises(ValueError, match="vocab_size"):
        acc.merge(rankops.RankAccumulator(11))
    with pytest.raises(TypeError, match="RankAccumulator"):
        acc.merge(acc.state_dict())
    with pytest.raises(TypeError):
        acc + 1
    with pytest.raises(TypeError):
        acc += "x"
    with pytest.raises(ValueError, match="vocab_size"):
        rankops.RankAccumulator(0)
    with pytest.raises(TypeError, match="vocab_size"):
        rankops.RankAccumulator(10.0)


# --------------------------------------------------------------------------------------------
# Non-finite logits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_logits_raise_and_leave_accumulator_unchanged(backend, bad):
    V = 60
    acc = rankops.RankAccumulator(V)
    acc.update(*make_batch(18, 50, V), backend=backend)
    before = snapshot(acc)

    logits, targets = make_batch(19, 4 * 9, V)
    logits = logits.view(4, 9, V).clone()
    targets = targets.view(4, 9).clone()
    targets[2, 5] = 3                                        # a kept row ...
    logits[2, 5, 17] = bad                                   # ... holding the bad value
    with pytest.raises(ValueError, match="check_finite") as info:
        acc.update(logits, targets, backend=backend)
    assert "(2, 5)" in str(info.value)                       # the error names the row
    after = snapshot(acc)
    assert after["n_tokens"] == before["n_tokens"]
    assert after["n_tied"] == before["n_tied"]
    for name in ARRAYS:
        assert torch.equal(after[name], before[name]), name

    # The same value in an ignored row is not read.
    targets[2, 5] = -100
    acc.update(logits, targets, backend=backend)
    assert acc.n_tokens == before["n_tokens"] + int((targets != -100).sum())


def masked_batch(dtype):
    """8 rows whose columns 50..99 are -inf (a common way to forbid tokens); targets < 50."""
    logits, targets = make_batch(20, 8, 100, dtype, ignore_frac=0.0)
    logits[:, 50:] = float("-inf")
    return logits, targets % 50


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_false_counts_masked_rows(backend):
    # With check_finite=False every logp here is finite, and the rows must count like any other.
    # Truth: the same rows restricted to their 50 finite columns, since -inf adds exp(-inf) = 0
    # to the softmax and is never >= a finite target. float64 logits through the torch
    # reference, so the two logsumexps (over 100 and 50 columns) agree to ~1e-16.
    logits, targets = masked_batch(torch.float64 if backend == "torch" else torch.float32)
    acc = rankops.RankAccumulator(100)
    acc.update(logits, targets, backend=backend, check_finite=False)
    assert acc.n_tokens == 8

    stats = rankops.token_stats(logits, targets, backend=backend, check_finite=False)
    assert bool(torch.isfinite(stats.logp).all())
    expected = rankops.RankAccumulator(100)
    expected.update_stats(stats.rank, stats.logp, ties=stats.ties)
    assert_same_stats(acc, expected)

    finite = rankops.RankAccumulator(50)
    finite.update(logits[:, :50].contiguous(), targets, backend="torch")
    assert torch.equal(acc.count[:50], finite.count) and int(acc.count[50:].sum()) == 0
    if backend == "torch":
        assert_sums_close(acc.sum_logp[:50], finite.sum_logp, 2 * finite.count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_false_nonfinite_logp_still_raises(backend):
    # A NaN logit in a kept row makes that token's logp NaN: it cannot be accumulated, and the
    # call must fail cleanly instead of adding NaN (or silently dropping the batch).
    logits, targets = masked_batch(torch.float32)
    acc = rankops.RankAccumulator(100)
    acc.update(*make_batch(22, 10, 100), backend=backend)
    before = snapshot(acc)
    logits[3, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(logits, targets, backend=backend, check_finite=False)
    after = snapshot(acc)
    assert after["n_tokens"] == before["n_tokens"] and after["n_tied"] == before["n_tied"]
    for name in ARRAYS:
        assert torch.equal(after[name], before[name]), name


# --------------------------------------------------------------------------------------------
# [B, T, V] inputs with padding
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_inputs_with_padding(backend, ignore_index):
    B, T, V = 3, 17, 50
    logits, targets = make_batch(21, B * T, V, ignore_frac=0.0)
    logits, targets = logits.view(B, T, V), targets.view(B, T).clone()
    lengths = [17, 9, 1]                                     # right-padded sequences
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    targets[~mask] = ignore_index

    acc3d = rankops.RankAccumulator(V)
    acc3d.update(logits, targets, ignore_index=ignore_index, backend=backend)
    flat = rankops.RankAccumulator(V)
    flat.update(logits[mask], targets[mask], backend=backend)  # only the real tokens
    assert acc3d.n_tokens == sum(lengths)
    assert_same_stats(acc3d, flat)

    # A non-contiguous [T, B, V] view of the same tokens (time-major) gives the same.
    tmajor = rankops.RankAccumulator(V)
    tmajor.update(logits.transpose(0, 1), targets.transpose(0, 1), ignore_index=ignore_index,
                  backend=backend)
    assert_same_stats(tmajor, flat)


def test_unvalidated_update_leaves_out_only_unaccumulable_tokens(backend, device):
    # validate=False: a token whose logp is NaN is left out and counted; the rest of the batch
    # is added, on every backend alike.
    logits, targets = make_batch(31, 12, 50)
    targets[targets == -100] = 3
    logits[4, :] = float("nan")   # row 4's logp is NaN
    acc = rankops.RankAccumulator(50)
    acc.update(logits.to(device), targets.to(device), backend=backend, check_finite=False, validate=False)
    want = rankops.RankAccumulator(50)
    rows = torch.arange(12) != 4
    want.update(logits[rows].to(device), targets[rows].to(device), backend=backend)
    assert int(acc.n_skipped) == 1
    assert torch.equal(acc.stats.cpu(), want.stats.cpu())
    assert int(acc.n_tied) == int(want.n_tied)
