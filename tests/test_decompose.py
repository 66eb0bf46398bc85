"""rankops.decompose / decompose_counts: CE = EE + SA - Conf (docs/DESIGN.md, "Definitions").

Truth here is computed in the test itself, in float64 from the per-token definitions (a hand-worked
case, an independent math.fsum implementation, and docs/DESIGN.md's known-answer case), never by
running the code under test.
"""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rankops

# The identity and the float64 components are sums of O(#ranks) rounded float64 terms formed
# from log n_k, log N, log S(k) and log Z. Where those intermediates are no larger than the
# components (every case below but test_identity_extreme_counts, which says why it differs),
# the error is a few hundred ulps of |EE| + |SA| + |Conf| at most: 1e-12 relative to that scale
# (docs/DESIGN.md's contract) leaves ~1e3x margin. Relative to CE alone it cannot hold when CE is
# tiny and the components cancel (logp ~ -1e-7 for nearly every token), so the scale is
# max(|CE|, |EE| + |SA| + |Conf|).
REL = 1e-12


def scale_of(ce, ee, sa, conf):
    return max(abs(ce), abs(ee) + abs(sa) + abs(conf))


def assert_identity(d):
    scale = scale_of(d.cross_entropy, d.error_entropy, d.self_alignment, d.confidence)
    residual = d.cross_entropy - (d.error_entropy + d.self_alignment - d.confidence)
    assert abs(residual) <= REL * scale, (residual, scale)
    assert abs(d.identity_residual) <= REL * scale


def reference_decomposition(rank, logp):
    """Independent float64 decomposition straight from docs/DESIGN.md, "Definitions" (python + math.fsum).

    rank: int array (-1 = ignored), logp: float array of one shape. Returns a dict."""
    rank = np.asarray(rank).reshape(-1).tolist()
    logp = np.asarray(logp, dtype=np.float64).reshape(-1).tolist()
    per_rank = {}
    for k, lp in zip(rank, logp):
        if k == -1:
            continue
        per_rank.setdefault(k, []).append(lp)
    ks = sorted(per_rank)
    n_tokens = sum(len(per_rank[k]) for k in ks)
    n = {k: len(per_rank[k]) for k in ks}
    log_S = {k: math.fsum(per_rank[k]) / n[k] for k in ks}          # log geometric mean of p
    m = max(log_S.values())
    log_Z = m + math.log(math.fsum(math.exp(log_S[k] - m) for k in ks))
    P = {k: n[k] / n_tokens for k in ks}
    log_Q = {k: log_S[k] - log_Z for k in ks}
    return {
        "ranks": ks,
        "counts": [n[k] for k in ks],
        "P": [P[k] for k in ks],
        "Q": [math.exp(log_Q[k]) for k in ks],
        "cross_entropy": -math.fsum(lp for k in ks for lp in per_rank[k]) / n_tokens,
        "error_entropy": -math.fsum(P[k] * math.log(P[k]) for k in ks),
        "self_alignment": math.fsum(P[k] * (math.log(P[k]) - log_Q[k]) for k in ks),
        "confidence": log_Z,
        "n_tokens": n_tokens,
        "top1_accuracy": P.get(0, 0.0),
        "mean_reciprocal_rank": math.fsum(n[k] / (k + 1) for k in ks) / n_tokens,
    }


def assert_matches_reference(d, ref):
    assert d.n_tokens == ref["n_tokens"]
    np.testing.assert_array_equal(d.ranks, ref["ranks"])     # integers: exact
    np.testing.assert_array_equal(d.counts, ref["counts"])
    scale = scale_of(ref["cross_entropy"], ref["error_entropy"], ref["self_alignment"],
                     ref["confidence"])
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert abs(getattr(d, name) - ref[name]) <= REL * scale, name
    # P = n_k / N is one correctly rounded division; Q = exp(log S - log Z) carries the absolute
    # error of log Z (~1e-15 here), which becomes a relative error of Q.
    np.testing.assert_allclose(d.P, ref["P"], rtol=1e-15, atol=0)
    np.testing.assert_allclose(d.Q, ref["Q"], rtol=1e-12, atol=0)
    assert d.top1_accuracy == pytest.approx(ref["top1_accuracy"], rel=1e-15, abs=0)
    assert d.mean_reciprocal_rank == pytest.approx(ref["mean_reciprocal_rank"], rel=1e-14)


# --------------------------------------------------------------------------------------------
# Random and adversarial data: identity and agreement with the independent implementation
# --------------------------------------------------------------------------------------------

def random_tokens(rng, n_tokens, n_ranks, V):
    """Ranks drawn from n_ranks distinct values in [0, V), logp < 0 spread over a few decades."""
    support = rng.choice(V, size=n_ranks, replace=False)
    rank = support[rng.integers(0, n_ranks, size=n_tokens)]
    logp = -rng.exponential(3.0, size=n_tokens) - 1e-3
    return rank.astype(np.int64), logp


RANDOM_CASES = {
    "many_ranks": dict(n_tokens=5000, n_ranks=900, V=1000),
    "few_ranks": dict(n_tokens=3000, n_ranks=3, V=50257),
    "single_rank": dict(n_tokens=700, n_ranks=1, V=10),
    "one_token": dict(n_tokens=1, n_ranks=1, V=1),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_identity_and_reference_random(case, seed):
    rng = np.random.default_rng(seed)
    rank, logp = random_tokens(rng, **RANDOM_CASES[case])
    d = rankops.decompose(rank, logp)
    assert_identity(d)
    assert_matches_reference(d, reference_decomposition(rank, logp))


def adversarial_cases():
    rng = np.random.default_rng(1234)
    cases = {}
    # logp spanning -1e-7 (a near-certain token) to -80 (e^-80 ~ 1.8e-35), log-uniformly.
    n = 4000
    cases["logp_span"] = (rng.integers(0, 200, size=n),
                          -np.exp(rng.uniform(math.log(1e-7), math.log(80.0), size=n)))
    # Very skewed counts: rank k occurs ~ 2^-k of the time, plus singletons far out.
    rank = np.minimum(rng.geometric(0.5, size=n) - 1, 40)
    rank = np.concatenate([rank, [500, 777, 999]])
    cases["skewed_counts"] = (rank, -rng.uniform(1e-7, 80.0, size=rank.size))
    # One rank holds almost all tokens, all nearly certain: CE ~ 1e-7, components cancel.
    rank = np.zeros(20000, dtype=np.int64)
    rank[:3] = [1, 2, 3]
    logp = np.full(rank.size, -1e-7)
    logp[:3] = [-20.0, -50.0, -80.0]
    cases["one_rank_dominant"] = (rank, logp)
    # Ranks next to V - 1 of a large real vocabulary (Qwen's 151936, Gemma's 262144).
    for V in (151936, 262144):
        rank = V - 1 - rng.integers(0, 4, size=300)
        cases[f"ranks_near_V-1_{V}"] = (rank, -rng.uniform(5.0, 80.0, size=rank.size))
    return cases


ADVERSARIAL = adversarial_cases()


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_identity_and_reference_adversarial(case):
    rank, logp = ADVERSARIAL[case]
    d = rankops.decompose(torch.from_numpy(np.asarray(rank, dtype=np.int64)), torch.from_numpy(logp))
    assert_identity(d)
    assert_matches_reference(d, reference_decomposition(rank, logp))


def test_identity_extreme_counts():
    # 1e15 tokens at rank 0 (int64 counts near float64's 2^53 exact-integer limit), a handful
    # elsewhere: P(k) ~ 1e-15 for the rare ranks, 1 - 1e-14 for rank 0, logp from -1e-7 to -80.
    count = np.zeros(64, dtype=np.int64)
    count[[0, 1, 17, 63]] = [10**15, 3, 1, 7]
    mean_logp = np.array([-1e-7, -12.0, -40.0, -80.0])
    sum_logp = np.zeros(64)
    sum_logp[[0, 1, 17, 63]] = count[[0, 1, 17, 63]] * mean_logp
    d = rankops.decompose_counts(count, sum_logp)
    assert d.n_tokens == 10**15 + 11
    assert_identity(d)
    # Independent evaluation from the counts.
    N = 10**15 + 11
    n = [10**15, 3, 1, 7]
    log_Z = math.log(math.fsum(math.exp(x) for x in mean_logp))
    ee = -math.fsum(k / N * math.log(k / N) for k in n)
    sa = math.fsum(k / N * (math.log(k / N) - (ls - log_Z)) for k, ls in zip(n, mean_logp))
    ce = -math.fsum(k * ls for k, ls in zip(n, mean_logp)) / N
    # Here the components are tiny (EE ~ 4e-13 nats, Conf ~ 6e-6) next to the float64
    # intermediates they are differences of: log N = 34.5, log S(k) down to -80, Z ~ 1. Those
    # are resolved to their ulp only (ulp(80) = 1.4e-14; e.g. log P = log n - log N carries
    # ~ulp(log N)), so the components agree to a few such ulps absolute, not relative to their
    # own tiny size. The identity above is unaffected: these errors cancel between the terms.
    floor = 4 * float(np.spacing(80.0))
    for got, want in ((d.cross_entropy, ce), (d.error_entropy, ee), (d.self_alignment, sa),
                      (d.confidence, log_Z)):
        assert abs(got - want) <= floor
    assert d.counts.tolist() == n


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.floats(-80.0, -1e-9)), min_size=1, max_size=200))
def test_identity_property(tokens):
    rank = np.array([k for k, _ in tokens], dtype=np.int64)
    logp = np.array([lp for _, lp in tokens], dtype=np.float64)
    d = rankops.decompose(rank, logp)
    assert_identity(d)
    assert_matches_reference(d, reference_decomposition(rank, logp))


def test_torch_and_numpy_inputs_agree_and_ignored_tokens_drop():
    rng = np.random.default_rng(7)
    rank, logp = random_tokens(rng, 400, 30, 100)
    d_np = rankops.decompose(rank, logp)
    d_t = rankops.decompose(torch.from_numpy(rank).to(torch.int32), torch.from_numpy(logp))
    # Ignored tokens (rank -1) carry any logp, even NaN, and change nothing.
    rank_pad = np.concatenate([rank, [-1, -1, -1]])
    logp_pad = np.concatenate([logp, [np.nan, -np.inf, 5.0]])
    d_pad = rankops.decompose(rank_pad, logp_pad)
    for d in (d_t, d_pad):
        assert d.n_tokens == 400
        np.testing.assert_array_equal(d.counts, d_np.counts)
        for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
            # Same float64 values summed in the same order: bit-identical.
            assert getattr(d, name) == getattr(d_np, name)


def test_decompose_equals_decompose_counts():
    rng = np.random.default_rng(11)
    rank, logp = random_tokens(rng, 1000, 50, 64)
    count = np.bincount(rank, minlength=64).astype(np.int64)
    sum_logp = np.array([math.fsum(logp[rank == k]) for k in range(64)])
    d1 = rankops.decompose(rank, logp)
    d2 = rankops.decompose_counts(torch.from_numpy(count), torch.from_numpy(sum_logp))
    np.testing.assert_array_equal(d1.counts, d2.counts)
    scale = scale_of(d1.cross_entropy, d1.error_entropy, d1.self_alignment, d1.confidence)
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        # The two routes differ only in how the per-rank sums were formed (bincount vs fsum).
        assert abs(getattr(d1, name) - getattr(d2, name)) <= REL * scale


# --------------------------------------------------------------------------------------------
# A case worked out by hand
# --------------------------------------------------------------------------------------------

def test_hand_worked_case():
    rank = torch.tensor([0, 0, 1, 3, 0, 3, -1])
    logp = torch.tensor([-0.1, -0.3, -1.2, -2.5, -0.2, -3.1, 0.0], dtype=torch.float64)
    d = rankops.decompose(rank, logp)

    # Six kept tokens: rank 0 three times (L0 = -0.6), rank 1 once (L1 = -1.2), rank 3 twice
    # (L3 = -5.6).
    P = [3 / 6, 1 / 6, 2 / 6]
    S = [math.exp(-0.6 / 3), math.exp(-1.2 / 1), math.exp(-5.6 / 2)]
    Z = S[0] + S[1] + S[2]
    Q = [s / Z for s in S]
    EE = -(P[0] * math.log(P[0]) + P[1] * math.log(P[1]) + P[2] * math.log(P[2]))
    SA = (P[0] * math.log(P[0] / Q[0]) + P[1] * math.log(P[1] / Q[1])
          + P[2] * math.log(P[2] / Q[2]))
    Conf = math.log(Z)
    CE = (0.1 + 0.3 + 1.2 + 2.5 + 0.2 + 3.1) / 6
    # The hand values satisfy the identity themselves (a check on the arithmetic above).
    assert CE == pytest.approx(EE + SA - Conf, rel=1e-14)

    assert d.n_tokens == 6
    assert d.ranks.tolist() == [0, 1, 3]
    assert d.counts.tolist() == [3, 1, 2]
    assert d.ties == "strict"
    # Hand formulas take different (but equally exact in real arithmetic) routes than the
    # library (P/Q ratio vs log difference, naive sum vs logsumexp): a few ulps apart.
    np.testing.assert_allclose(d.P, P, rtol=1e-15)
    np.testing.assert_allclose(d.Q, Q, rtol=1e-14)
    assert d.error_entropy == pytest.approx(EE, rel=1e-14)
    assert d.self_alignment == pytest.approx(SA, rel=1e-14)
    assert d.confidence == pytest.approx(Conf, rel=1e-14)
    assert d.cross_entropy == pytest.approx(CE, rel=1e-14)
    assert d.top1_accuracy == 0.5                                    # 3 of 6 at rank 0
    assert d.mean_reciprocal_rank == pytest.approx((3 * 1 + 1 / 2 + 2 * (1 / 4)) / 6, rel=1e-15)
    assert d.error_entropy_share == pytest.approx(EE / CE, rel=1e-14)
    total = abs(EE) + abs(SA) + abs(Conf)
    shares = d.magnitude_shares
    assert shares["error_entropy"] == pytest.approx(abs(EE) / total, rel=1e-14)
    assert shares["self_alignment"] == pytest.approx(abs(SA) / total, rel=1e-14)
    assert shares["confidence"] == pytest.approx(abs(Conf) / total, rel=1e-14)
    assert d.error_entropy_magnitude_share == shares["error_entropy"]
    assert math.fsum(shares.values()) == pytest.approx(1.0, rel=1e-15)


def test_no_rank_zero_gives_zero_top1():
    d = rankops.decompose(np.array([2, 5, 5]), np.array([-1.0, -2.0, -3.0]))
    assert d.top1_accuracy == 0.0
    assert d.mean_reciprocal_rank == pytest.approx((1 / 3 + 2 / 6) / 3, rel=1e-15)


def test_single_rank_has_zero_entropy_and_alignment():
    # P = Q = 1 at the one rank: EE = SA = 0 and Conf = log S = -CE, with no rounding at all.
    d = rankops.decompose(np.array([4, 4, 4, 4]), np.array([-0.5, -1.5, -2.0, -4.0]))
    assert d.error_entropy == 0.0
    assert d.self_alignment == 0.0
    assert d.confidence == -2.0
    assert d.cross_entropy == 2.0


# --------------------------------------------------------------------------------------------
# docs/DESIGN.md's known-answer case
# --------------------------------------------------------------------------------------------

KNOWN = dict(distinct_ranks=244, rank_sum=130316, cross_entropy=7.082532203024,
             error_entropy=3.907218078939, self_alignment=1.950343193894,
             confidence=-1.224970930191)
# The expected values are printed to 12 decimals (rounding <= 5e-13); float64 evaluation adds
# ~1e-14. So an absolute tolerance of 1e-12 (tighter than 1e-12 relative, as every |value| >= 1).
KNOWN_ABS = 1e-12


def known_answer_case():
    """(logits [512, 1000] float32, targets [512] int64) exactly as docs/DESIGN.md, "Definitions" says."""
    T, V = 512, 1000
    t = np.arange(T, dtype=np.float64)[:, None]
    v = np.arange(V, dtype=np.float64)[None, :]
    t_mod7 = (np.arange(T) % 7 + 1).astype(np.float64)[:, None]
    z = (4 * np.cos(0.37 * (t + 1) * (v + 1)) + 2 * np.sin(0.011 * v * t_mod7)
         - 0.002 * v).astype(np.float32)
    order = np.argsort(-z, axis=1, kind="stable")
    top = np.take_along_axis(z, order[:, :3], axis=1)
    # The "largest" and "second-largest" rules are unambiguous: no ties among the top three.
    assert (top[:, 0] > top[:, 1]).all() and (top[:, 1] > top[:, 2]).all()
    y = (37 * np.arange(T) + 11) % V
    rows = np.arange(T)
    y = np.where(rows % 3 == 0, order[:, 0], y)   # later rules overwrite earlier ones
    y = np.where(rows % 5 == 1, order[:, 1], y)
    return torch.from_numpy(z), torch.from_numpy(y.astype(np.int64))


def test_library_known_answer_case_matches_design():
    # rankops.testing ships the same case for `python -m rankops` self-checks: it must be the
    # case docs/DESIGN.md describes, with docs/DESIGN.md's numbers.
    from rankops.testing import KNOWN_ANSWER, known_answer_case as library_case
    z32, y = known_answer_case()
    lib_z, lib_y = library_case()
    assert lib_z.dtype == torch.float32
    assert torch.equal(lib_z, z32)
    assert torch.equal(lib_y.to(torch.int64), y)
    assert KNOWN_ANSWER["n_distinct_ranks"] == KNOWN["distinct_ranks"]
    assert KNOWN_ANSWER["sum_of_ranks"] == KNOWN["rank_sum"]
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert KNOWN_ANSWER[name] == KNOWN[name]


def numpy_rank_logp(z32, y):
    """Rank on the float32 values and float64 logp of the float32 logits, in numpy."""
    z = z32.numpy()
    y = y.numpy()
    z_t = z[np.arange(z.shape[0]), y]
    rank = (z > z_t[:, None]).sum(axis=1)
    zd = z.astype(np.float64)                     # exact upcast
    m = zd.max(axis=1)
    lse = m + np.log(np.exp(zd - m[:, None]).sum(axis=1))
    return rank.astype(np.int64), zd[np.arange(z.shape[0]), y] - lse


def assert_known(d, slack=0.0):
    assert d.ranks.size == KNOWN["distinct_ranks"]
    assert d.n_tokens == 512
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert abs(getattr(d, name) - KNOWN[name]) <= KNOWN_ABS + slack, (name, getattr(d, name))


def test_known_answer_float64():
    z32, y = known_answer_case()
    np_rank, np_logp = numpy_rank_logp(z32, y)
    assert len(np.unique(np_rank)) == KNOWN["distinct_ranks"]
    assert int(np_rank.sum()) == KNOWN["rank_sum"]

    # float64 upcast of float32 logits is exact, so ranks equal those of the float32 values.
    stats = rankops.token_stats(z32.double(), y, backend="torch")
    assert stats.logp.dtype == torch.float64
    np.testing.assert_array_equal(stats.rank.numpy(), np_rank)
    assert int(stats.rank.sum()) == KNOWN["rank_sum"]
    # Two float64 logsumexps of the same 1000 values: ~1e-15.
    np.testing.assert_allclose(stats.logp.numpy(), np_logp, rtol=0, atol=1e-13)

    d = rankops.decompose(stats.rank, stats.logp)
    assert_known(d)
    assert_identity(d)
    # The independent implementation on the independent per-token values agrees as well.
    ref = reference_decomposition(np_rank, np_logp)
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert abs(ref[name] - KNOWN[name]) <= KNOWN_ABS


# Per-token logp of the CPU kernel is float32: the result is rounded once (half an ulp, 4.8e-7
# for |logp| in [8, 16)) after an fp32 sum of ~1000 exp terms (each ~1 ulp, summed in SIMD
# lanes); 4e-6 is ~4 ulps at the largest |logp| here.
FP32_LOGP_ABS = 4e-6


@pytest.mark.skipif("cpu" not in rankops.available_backends(), reason="CPU kernel not built")
def test_known_answer_cpu_kernel(cpu_isa):
    # Every compiled instruction set (cpu_isa, tests/conftest.py) must meet the same bounds.
    z32, y = known_answer_case()
    np_rank, np_logp = numpy_rank_logp(z32, y)
    stats = rankops.token_stats(z32, y, backend="cpu")
    assert stats.logp.dtype == torch.float32
    np.testing.assert_array_equal(stats.rank.numpy(), np_rank)        # ranks: exact
    delta = float(np.abs(stats.logp.numpy().astype(np.float64) - np_logp).max())
    assert delta <= FP32_LOGP_ABS

    d = rankops.decompose(stats.rank, stats.logp)
    assert d.ranks.size == KNOWN["distinct_ranks"]
    # With ranks identical, every per-rank mean log S(k) moves by at most delta, so CE (a mean
    # of logp) and Conf (a logsumexp, 1-Lipschitz in the max norm) move by <= delta, SA =
    # CE - EE + Conf by <= 2 delta, and EE (a function of the counts only) not at all.
    slack = KNOWN_ABS
    assert abs(d.error_entropy - KNOWN["error_entropy"]) <= slack
    assert abs(d.cross_entropy - KNOWN["cross_entropy"]) <= delta + slack
    assert abs(d.confidence - KNOWN["confidence"]) <= delta + slack
    assert abs(d.self_alignment - KNOWN["self_alignment"]) <= 2 * delta + slack


@pytest.mark.parametrize("backend", [b for b in rankops.available_backends()
                                     if b in ("cpu", "torch")])   # backends taking CPU tensors
def test_known_answer_through_accumulator(backend):
    # The whole chain users run: logits -> RankAccumulator -> decompose. float64 logits go
    # through the torch backend (float64 logp); the CPU kernel reads the float32 logits.
    z32, y = known_answer_case()
    acc = rankops.RankAccumulator(1000)
    if backend == "torch":
        acc.update(z32.double(), y, backend="torch")
        # The accumulator keeps logp sums in fixed point with 40 fractional bits (docs/DESIGN.md
        # allows it): each float64 logp is rounded by <= 2^-41, which moves CE and Conf by at
        # most that and SA by at most 2^-40 (the argument of test_known_answer_cpu_kernel).
        assert_known(acc.decompose(), slack=2.0 ** -40)
    else:
        acc.update(z32, y, backend=backend)
        d = acc.decompose()
        assert d.ranks.size == KNOWN["distinct_ranks"]
        assert int((torch.arange(1000) * acc.count).sum()) == KNOWN["rank_sum"]
        # Bounds as in test_known_answer_cpu_kernel, with delta <= FP32_LOGP_ABS.
        assert abs(d.error_entropy - KNOWN["error_entropy"]) <= KNOWN_ABS
        assert abs(d.cross_entropy - KNOWN["cross_entropy"]) <= FP32_LOGP_ABS
        assert abs(d.confidence - KNOWN["confidence"]) <= FP32_LOGP_ABS
        assert abs(d.self_alignment - KNOWN["self_alignment"]) <= 2 * FP32_LOGP_ABS


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_all_tokens_ignored_raises_not_nan():
    with pytest.raises(ValueError, match=r"n_tokens = 0"):
        rankops.decompose(torch.full((5,), -1), torch.zeros(5))
    with pytest.raises(ValueError, match=r"n_tokens = 0"):
        rankops.decompose_counts(np.zeros(10, dtype=np.int64), np.zeros(10))
    with pytest.raises(ValueError, match=r"n_tokens = 0"):
        rankops.decompose(np.zeros(0, dtype=np.int64), np.zeros(0))
    acc = rankops.RankAccumulator(7)
    acc.update(torch.randn(4, 7), torch.full((4,), -100))
    assert acc.n_tokens == 0
    with pytest.raises(ValueError, match=r"n_tokens = 0"):
        acc.decompose()


def test_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        rankops.decompose(np.zeros(4, dtype=np.int64), np.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        rankops.decompose(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="count and sum_logp"):
        rankops.decompose_counts(np.ones(4, dtype=np.int64), np.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        rankops.decompose_counts(np.ones((2, 2), dtype=np.int64), np.zeros((2, 2)))


def test_float_ranks_rejected():
    with pytest.raises(TypeError, match="rank"):
        rankops.decompose(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -2.0]))
    with pytest.raises(TypeError, match="count"):
        rankops.decompose_counts(np.array([1.0, 2.0]), np.array([-1.0, -2.0]))
    with pytest.raises(TypeError, match="logp"):
        rankops.decompose(np.array([0, 1]), np.array([-1, -2]))   # integer logp
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        rankops.decompose([0, 1], [-1.0, -2.0])


def test_ranks_below_minus_one_rejected():
    with pytest.raises(ValueError, match="rank must be >= 0, or -1"):
        rankops.decompose(np.array([0, -2, 3]), np.array([-1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        rankops.decompose_counts(np.array([1, -1]), np.array([-1.0, 0.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logp_rejected(bad):
    with pytest.raises(ValueError, match="non-finite"):
        rankops.decompose(np.array([0, 1, 2]), np.array([-1.0, bad, -2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        rankops.decompose_counts(np.array([1, 1]), np.array([-1.0, bad]))


def test_bad_ties_mode():
    rank, logp = np.array([0, 1]), np.array([-1.0, -2.0])
    for call in (lambda: rankops.decompose(rank, logp, ties="optimistic"),
                 lambda: rankops.decompose_counts(np.array([1, 1]), logp, ties="Strict"),
                 lambda: rankops.RankAccumulator(3).decompose(ties="mean")):
        with pytest.raises(ValueError, match="ties must be one of"):
            call()
    d = rankops.decompose(rank, logp, ties="pessimistic")
    assert d.ties == "pessimistic"


# --------------------------------------------------------------------------------------------
# Result object
# --------------------------------------------------------------------------------------------

SCALARS = ("cross_entropy", "error_entropy", "self_alignment", "confidence",
           "error_entropy_share", "top1_accuracy", "mean_reciprocal_rank")


def test_as_dict_is_json_ready_and_matches_attributes():
    rng = np.random.default_rng(3)
    rank, logp = random_tokens(rng, 300, 20, 50)
    d = rankops.decompose(rank, logp)

    plain = d.as_dict()
    assert set(plain) == {"ties", "n_tokens", "n_distinct_ranks", "magnitude_shares", *SCALARS}
    assert json.loads(json.dumps(plain)) == plain       # JSON round trip loses nothing
    for name in SCALARS:
        assert plain[name] == getattr(d, name)
        assert type(plain[name]) is float
    assert plain["n_tokens"] == d.n_tokens == 300 and type(plain["n_tokens"]) is int
    assert plain["n_distinct_ranks"] == d.ranks.size and type(plain["n_distinct_ranks"]) is int
    assert plain["magnitude_shares"] == d.magnitude_shares
    assert plain["ties"] == "strict"

    full = d.as_dict(arrays=True)
    assert set(full) == set(plain) | {"ranks", "counts", "P", "Q"}
    assert json.loads(json.dumps(full)) == full
    assert full["ranks"] == d.ranks.tolist()
    assert full["counts"] == d.counts.tolist()
    assert full["P"] == d.P.tolist()
    assert full["Q"] == d.Q.tolist()


def test_repr_names_components_and_values():
    d = rankops.decompose(np.array([0, 0, 1, 3]), np.array([-0.1, -0.2, -1.5, -3.0]))
    text = repr(d)
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence",
                 "top1_accuracy", "mean_reciprocal_rank"):
        assert name in text
    for value in (d.cross_entropy, d.error_entropy, d.self_alignment, d.confidence):
        assert f"{value: .6f}" in text
    assert "n_tokens=4" in text and "ties='strict'" in text
