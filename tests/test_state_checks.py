"""Impossible states are refused, failures change nothing, and edge results stay defined.

Issue 13's cases for the accumulator and the analysis layer: load_state_dict of the
accumulator and of the running loss statistics accepts only states some sequence of updates
could produce; a failed call leaves the state where it was (device included); concurrent
updates from threads add up exactly; decompose sizes its work by the observed ranks; a model
right on every token has a defined (NaN) share instead of a ZeroDivisionError; and bad
arguments get messages that name them.
"""
import math
import resource
import threading

import numpy as np
import pytest
import torch

import rankops
from rankops import fit
from rankops.ops.accumulate import COUNT, COUNT_PESS, SUM_HI, SUM_LO, SUM_LO_PESS

V = 50


def filled(seed=0, n=64, vocab=V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    acc = rankops.RankAccumulator(vocab)
    acc.update(logits, targets)
    return acc, logits, targets


def corrupted(edit):
    acc, _, _ = filled()
    state = acc.state_dict()
    edit(state)
    return state


def set_stat(row, value, col=None):
    def edit(state):
        stats = state["stats"]
        k = int(torch.nonzero(stats[COUNT])[0, 0]) if col is None else col
        stats[row, k] = value
    return edit


IMPOSSIBLE = {
    "lo_word_2_pow_50": set_stat(SUM_LO, 2 ** 50),
    "lo_word_negative": set_stat(SUM_LO_PESS, -1),
    "positive_logp_sum": set_stat(SUM_HI, 5),
    "count_raised_by_1e6": lambda s: s["stats"][COUNT].add_(torch.nn.functional.one_hot(
        torch.nonzero(s["stats"][COUNT])[0], V)[0] * 10 ** 6),
    "pessimistic_total_differs": set_stat(COUNT_PESS, 0, col=None),
    "negative_count": set_stat(COUNT, -1),
    "sum_in_empty_bin": lambda s: s["stats"][SUM_HI].__setitem__(V - 1, -1) if int(s["stats"][COUNT][V - 1]) == 0
    else s["stats"][SUM_HI].__setitem__(int(torch.nonzero(s["stats"][COUNT] == 0)[0, 0]), -1),
    "n_tied_above_n_tokens": lambda s: s.__setitem__("n_tied", torch.tensor(10 ** 6)),
    "n_tied_negative": lambda s: s.__setitem__("n_tied", torch.tensor(-1)),
    "n_skipped_negative": lambda s: s.__setitem__("n_skipped", torch.tensor(-5)),
    "n_tied_float": lambda s: s.__setitem__("n_tied", 3.0),
    "n_tied_string": lambda s: s.__setitem__("n_tied", "3"),
    "n_tied_wrong_shape": lambda s: s.__setitem__("n_tied", torch.zeros(3, dtype=torch.int64)),
    "format_tensor": lambda s: s.__setitem__("format", torch.tensor(1)),
    "format_string": lambda s: s.__setitem__("format", "1"),
    "ties_known_string": lambda s: s.__setitem__("ties_known", "yes"),
    "stats_float": lambda s: s.__setitem__("stats", s["stats"].double()),
}


REFUSALS = {  # case -> what the refusal must say (it names the field)
    'count_raised_by_1e6': 'tokens by strict rank but 64 by pessimistic rank',
    'format_string': "state['format'] must be an int",
    'format_tensor': "state['format'] must be an int",
    'lo_word_2_pow_50': 'strict low word outside [0, 2^32)',
    'lo_word_negative': 'pessimistic low word outside [0, 2^32)',
    'n_skipped_negative': 'n_skipped = -5, below 0',
    'n_tied_above_n_tokens': 'n_tied = 1000000, outside [0, n_tokens',
    'n_tied_float': "state['n_tied'] must be an int",
    'n_tied_negative': 'n_tied = -1, outside',
    'n_tied_string': "state['n_tied'] must be an int",
    'n_tied_wrong_shape': "state['n_tied'] must be an int or an int64 tensor holding one number",
    'negative_count': 'negative strict count',
    'pessimistic_total_differs': 'pessimistic',
    'positive_logp_sum': 'positive strict logp sum',
    'stats_float': "state['stats'] must be an int64 tensor",
    'sum_in_empty_bin': 'strict logp sum at a rank without tokens',
    'ties_known_string': "state['ties_known'] must be a bool",
}


@pytest.mark.parametrize("name", sorted(IMPOSSIBLE))
def test_load_state_dict_refuses_impossible_state(name):
    state = corrupted(IMPOSSIBLE[name])
    target, _, _ = filled(seed=1)
    before = target.state_dict()
    with pytest.raises((ValueError, TypeError)) as raised:
        target.load_state_dict(state)
    assert REFUSALS[name] in str(raised.value)
    after = target.state_dict()
    assert torch.equal(after["stats"], before["stats"]) and int(after["n_tied"]) == int(before["n_tied"])


def test_load_state_dict_accepts_what_updates_produce_and_makes_it_contiguous():
    acc, logits, targets = filled()
    state = acc.state_dict()
    state["stats"] = state["stats"].t().contiguous().t()  # same values, transposed strides
    assert not state["stats"].is_contiguous()
    other = rankops.RankAccumulator(V)
    other.load_state_dict(state)
    assert other.stats.is_contiguous()
    other.update(logits, targets)  # a later update works on the loaded state
    acc.update(logits, targets)
    assert torch.equal(other.stats, acc.stats)
    no_ties = rankops.RankAccumulator(V)
    s = rankops.token_stats(logits, targets)
    no_ties.update_stats(s.rank, s.logp)  # pessimistic rows untouched: still a possible state
    rankops.RankAccumulator(V).load_state_dict(no_ties.state_dict())


RUNNING_IMPOSSIBLE = {
    "decay_negative": lambda s: s.__setitem__("decay", -0.1),
    "decay_above_one": lambda s: s.__setitem__("decay", 1.5),
    "decay_nan": lambda s: s.__setitem__("decay", float("nan")),
    "count_nan": lambda s: s["count"].__setitem__(0, float("nan")),
    "count_negative": lambda s: s["count"].__setitem__(0, -1.0),
    "sum_positive": lambda s: s["sum_logp"].__setitem__(int(torch.nonzero(s["count"])[0, 0]), 1.0),
    "count_string": lambda s: s.__setitem__("count", "x"),
    "n_updates_negative": lambda s: s.__setitem__("n_updates", -1),
    "missing_key": lambda s: s.pop("sum_logp"),
}


RUNNING_REFUSALS = {
    'count_nan': "state['count'] holds NaN",
    'count_negative': 'counts must be >= 0',
    'count_string': "state['count'] must be a floating-point tensor",
    'decay_above_one': "state['decay'] must be a float in [0, 1]",
    'decay_nan': "state['decay'] must be a float in [0, 1]",
    'decay_negative': "state['decay'] must be a float in [0, 1]",
    'missing_key': "missing ['sum_logp']",
    'n_updates_negative': "state['n_updates'] must be an int >= 0",
    'sum_positive': 'logp sums <= 0',
}


@pytest.mark.parametrize("name", sorted(RUNNING_IMPOSSIBLE))
def test_running_rank_stats_load_state_dict_refuses_impossible_state(name):
    running = rankops.RunningRankStats(V, decay=0.5)
    g = torch.Generator().manual_seed(0)
    rankops.compensated_cross_entropy(torch.randn(32, V, generator=g), torch.randint(0, V, (32,), generator=g),
                                      0.3, running=running)
    state = running.state_dict()
    RUNNING_IMPOSSIBLE[name](state)
    fresh = rankops.RunningRankStats(V, decay=0.9)
    with pytest.raises((ValueError, TypeError)) as raised:
        fresh.load_state_dict(state)
    assert RUNNING_REFUSALS[name] in str(raised.value)
    assert fresh.decay == 0.9 and fresh.n_updates == 0 and not fresh.count.any()


def test_failed_call_with_meta_tensors_leaves_the_state_on_its_device():
    acc, logits, targets = filled()
    before = acc.state_dict()
    with pytest.raises((TypeError, ValueError)):
        acc.update(logits.to("meta"), targets.to("meta"))
    assert acc.device.type == "cpu"
    empty = rankops.RankAccumulator(V)
    with pytest.raises((TypeError, ValueError)):
        empty.update(logits.to("meta"), targets.to("meta"))
    with pytest.raises((TypeError, ValueError), match="rank"):
        empty.update_stats(torch.zeros(3, dtype=torch.int64, device="meta"), torch.zeros(3, device="meta"))
    assert empty.device.type == "cpu"
    acc.update(logits, targets)  # both still work, and hold exactly what succeeded
    empty.update(logits, targets)
    assert torch.equal(acc.stats, (empty + empty).stats)
    assert acc.n_tokens == 2 * before["stats"][COUNT].sum().item()


def test_updates_from_threads_add_up_exactly():
    acc = rankops.RankAccumulator(V)
    # Large batches of few columns: the histogram updates (in C++, without the GIL) are a big
    # part of each call, so unsynchronised threads would overlap in them.
    batches = [filled(seed=s, n=20000)[1:] for s in range(48)]
    want = rankops.RankAccumulator(V)
    for logits, targets in batches:
        want.update(logits, targets)
    barrier = threading.Barrier(4)

    def work(part):
        barrier.wait()
        for logits, targets in part:
            acc.update(logits, targets)
            acc.update_stats(*(lambda s: (s.rank, s.logp, s.ties))(rankops.token_stats(logits, targets)))

    threads = [threading.Thread(target=work, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    twice = want + want
    assert torch.equal(acc.stats, twice.stats)
    assert int(acc.n_tied) == int(twice.n_tied)


def test_all_correct_model_has_defined_shares():
    d = rankops.decompose(torch.tensor([0, 0, 0]), torch.tensor([0.0, 0.0, 0.0]))
    assert d.cross_entropy == 0.0 and math.isnan(d.error_entropy_share)
    text = repr(d)  # no ZeroDivisionError
    assert "cross_entropy" in text
    as_dict = d.as_dict()
    assert as_dict["error_entropy_share"] is None
    assert all(v is None for v in as_dict["magnitude_shares"].values())
    acc = rankops.RankAccumulator(3)
    acc.update(torch.tensor([[200.0, -200.0, -200.0]] * 4), torch.tensor([0, 0, 0, 0]))
    assert acc.decompose().cross_entropy == 0.0
    repr(acc.decompose())


def test_decompose_refuses_positive_logp_and_overflowing_counts():
    with pytest.raises(ValueError, match="logp"):
        rankops.decompose(torch.tensor([0, 1]), torch.tensor([-0.5, 0.25]))
    with pytest.raises(ValueError, match="sum_logp"):
        rankops.decompose_counts(torch.tensor([1, 2]), torch.tensor([-1.0, 3.0]))
    with pytest.raises(ValueError, match="count"):
        rankops.decompose_counts(np.array([2 ** 62, 2 ** 62], dtype=np.int64), np.array([-1.0, -1.0]))


def test_decompose_work_is_sized_by_the_observed_ranks():
    # A rank of 3e9 would ask a bincount for 22 GiB; the observed ranks are two.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 8 * 2 ** 30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        d = rankops.decompose(torch.tensor([3 * 10 ** 9, 0, 10 ** 8]), torch.tensor([-20.0, -0.1, -9.0]))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert d.ranks.tolist() == [0, 10 ** 8, 3 * 10 ** 9] and d.n_tokens == 3


def test_decompose_takes_half_precision_logp():
    s = rankops.decompose(torch.tensor([0, 2]), torch.tensor([-0.5, -2.0], dtype=torch.bfloat16))
    w = rankops.decompose(torch.tensor([0, 2]), torch.tensor([-0.5, -2.0]))
    assert s.cross_entropy == w.cross_entropy


def test_compensated_loss_refuses_bad_num_items_and_min_weight():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, V, generator=g), torch.randint(0, V, (8,), generator=g)
    for bad in (torch.tensor(0), torch.tensor(-3.0)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            rankops.compensated_cross_entropy(logits, targets, 0.3, num_items_in_batch=bad)
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="min_weight"):
            rankops.compensated_cross_entropy(logits, targets, 0.3, min_weight=bad)


def test_fit_edge_cases_say_what_is_wrong():
    x = np.geomspace(1e6, 1e9, 5)
    y = 2.0 * x ** -0.1
    with pytest.raises(ValueError, match=r"y must be finite, got y\[4\] = nan"):
        fit.leave_largest_out(x, np.where(x == x.max(), np.nan, y))
    with pytest.raises(ValueError, match=r"y must be nonzero .*got y\[4\] = 0"):
        fit.leave_largest_out(x, np.where(x == x.max(), 0.0, y))
    with pytest.raises(ValueError, match="seed"):
        fit.bootstrap(x, y, seed=-1)


def test_fit_saturating_reports_non_convergence(monkeypatch):
    import scipy.optimize

    class Failed:
        x, fun, success = np.array([0.5, 0.0, 0.5]), float("inf"), True

    monkeypatch.setattr(scipy.optimize, "minimize", lambda *a, **k: Failed())
    x = np.geomspace(1e5, 1e9, 8)
    with pytest.warns(fit.RankopsFitWarning, match="did not converge"):
        res = fit.fit_saturating(x, 1.7 + 40.0 * x ** -0.35)
    assert res.converged is False


def test_messages_name_the_argument():
    logits = torch.randn(4, V)
    targets = torch.randint(0, V, (4,))
    with pytest.raises(TypeError, match="logits"):
        rankops.token_stats(logits.to_sparse(), targets)
    with pytest.raises(TypeError, match="logits"):
        rankops.token_stats(logits.to("meta"), targets.to("meta"))
    with pytest.raises(ValueError, match="vocab_size"):
        rankops.RankAccumulator(2 ** 62)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            rankops.RankAccumulator(V, device="cuda")
