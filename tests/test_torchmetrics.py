"""rankops.integrations.torchmetrics.CrossEntropyDecomposition: a torchmetrics Metric on the
RankAccumulator state.

The state is integer fixed point, so the metric must agree with RankAccumulator bit for bit in
one process, and two processes (gloo on CPU, each with half the batches) must compute the
single-process result exactly, having summed their states with all_reduce, never all_gather.
"""
import datetime
import math

import pytest
import torch

pytest.importorskip("torchmetrics")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torchmetrics.utilities.distributed import gather_all_tensors  # noqa: E402

import rankops  # noqa: E402
from rankops.integrations.torchmetrics import CrossEntropyDecomposition  # noqa: E402

# A padded output layer (1031 columns for 1000 real tokens, as Pythia pads 50277 to 50304):
# the metric must rank within the first VOCAB columns only.
VOCAB, COLUMNS = 1000, 1031
FIELDS = ("cross_entropy", "error_entropy", "self_alignment", "confidence",
          "error_entropy_share", "error_entropy_magnitude_share", "top1_accuracy",
          "mean_reciprocal_rank")


def make_batches(n_batches=6):
    """Deterministic batches [B, T, COLUMNS] of mixed dtypes with ~10% ignored targets.

    bf16 and fp16 logits on a coarse grid make ties between the target and other columns
    common, so the tie counter and the tie-pessimistic state are exercised."""
    g = torch.Generator().manual_seed(1234)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    out = []
    for i in range(n_batches):
        shape = (2 + i % 3, 16, COLUMNS)
        logits = torch.randn(shape, generator=g) * 3
        if i % 2:
            logits = torch.round(logits * 4) / 4  # a coarse grid: many exact ties
        top = logits[..., :VOCAB].topk(3, dim=-1).indices
        pick = torch.randint(0, 3, shape[:-1], generator=g).unsqueeze(-1)
        easy = top.gather(-1, pick).squeeze(-1)
        targets = torch.where(torch.rand(shape[:-1], generator=g) < 0.5, easy,
                              torch.randint(0, VOCAB, shape[:-1], generator=g))
        targets[torch.rand(shape[:-1], generator=g) < 0.1] = -100
        out.append((logits.to(dtypes[i % 3]), targets))
    return out


def accumulate(batches):
    acc = rankops.RankAccumulator(VOCAB)
    for logits, targets in batches:
        acc.update(logits, targets)
    return acc


def assert_result_equals(result, d, tie_rate):
    """compute()'s dict against a rankops Decomposition: the same float64 values exactly."""
    for name in FIELDS:
        assert result[name].dtype == torch.float64
        assert result[name].item() == getattr(d, name), name
    assert result["tie_rate"].item() == tie_rate
    assert result["n_tokens"].dtype == torch.int64 and result["n_tokens"].item() == d.n_tokens


def assert_same_state(metric, acc):
    assert torch.equal(metric.stats, acc.stats)
    assert metric.n_tied.item() == acc.n_tied.item()
    assert metric.n_skipped.item() == acc.n_skipped.item()


@pytest.mark.parametrize("ties", ["strict", "pessimistic"])
def test_matches_rank_accumulator(ties):
    batches = make_batches()
    metric = CrossEntropyDecomposition(VOCAB, ties=ties)
    for logits, targets in batches:
        metric.update(logits, targets)
    acc = accumulate(batches)
    assert_same_state(metric, acc)
    assert acc.n_tied.item() > 0  # the batches do exercise ties
    d = acc.decompose(ties)
    assert_result_equals(metric.compute(), d, acc.tie_rate)
    full = metric.decomposition()
    assert full.ties == ties and full.cross_entropy == d.cross_entropy
    assert (full.ranks == d.ranks).all() and (full.P == d.P).all() and (full.Q == d.Q).all()
    other = "strict" if ties == "pessimistic" else "pessimistic"
    assert metric.decomposition(other).self_alignment == acc.decompose(other).self_alignment
    # The metric's own identity, as a check that the dict is not a relabelling.
    r = metric.compute()
    ce = r["error_entropy"] + r["self_alignment"] - r["confidence"]
    assert math.isclose(ce.item(), r["cross_entropy"].item(), rel_tol=1e-12)


def test_forward_returns_the_batch_value_and_accumulates():
    batches = make_batches(4)
    metric = CrossEntropyDecomposition(VOCAB)
    for logits, targets in batches:
        batch_acc = accumulate([(logits, targets)])
        assert_result_equals(metric(logits, targets), batch_acc.decompose(), batch_acc.tie_rate)
    acc = accumulate(batches)
    assert_same_state(metric, acc)
    assert metric.update_count == len(batches)
    assert_result_equals(metric.compute(), acc.decompose(), acc.tie_rate)


def test_compute_for_a_model_right_on_every_token():
    # CE = 0: the share of CE is undefined (NaN), not a ZeroDivisionError.
    metric = CrossEntropyDecomposition(vocab_size=3)
    metric.update(torch.tensor([[200.0, -200.0, -200.0]] * 4), torch.tensor([0, 0, 0, 0]))
    out = metric.compute()
    assert out["cross_entropy"].item() == 0.0
    assert math.isnan(out["error_entropy_share"].item())
    assert metric.decomposition().cross_entropy == 0.0


def test_reset():
    batches = make_batches(4)
    metric = CrossEntropyDecomposition(VOCAB)
    for logits, targets in batches:
        metric.update(logits, targets)
    first = metric.compute()
    metric.reset()
    assert not metric.stats.any() and metric.n_tied.item() == 0 and metric.update_count == 0
    with pytest.warns(UserWarning, match="before the ``update``"), \
            pytest.raises(ValueError, match="nothing to decompose"):
        metric.compute()
    for logits, targets in batches:
        metric.update(logits, targets)
    again = metric.compute()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_merge_state():
    batches = make_batches()
    acc = accumulate(batches)
    first, second = CrossEntropyDecomposition(VOCAB), CrossEntropyDecomposition(VOCAB)
    for i, (logits, targets) in enumerate(batches):
        (first if i < 2 else second).update(logits, targets)
    first.merge_state(second)
    assert_same_state(first, acc)
    assert_result_equals(first.compute(), acc.decompose(), acc.tie_rate)  # not a stale cache

    from_dict = CrossEntropyDecomposition(VOCAB)
    from_dict.merge_state(second.metric_state)  # torchmetrics' dict of states
    from_dict.merge_state(accumulate(batches[:2]).state_dict())  # RankAccumulator's dict
    assert_same_state(from_dict, acc)
    from_acc = CrossEntropyDecomposition(VOCAB)
    from_acc.merge_state(acc)
    assert_same_state(from_acc, acc)

    with pytest.raises(ValueError, match="vocab_size"):
        first.merge_state(CrossEntropyDecomposition(VOCAB + 1))
    with pytest.raises(ValueError, match="vocab_size"):
        first.merge_state(rankops.RankAccumulator(VOCAB + 1))
    with pytest.raises(ValueError, match="missing"):
        first.merge_state({"stats": acc.stats})
    with pytest.raises(ValueError, match="int64"):
        first.merge_state({"stats": acc.stats.double(), "n_tied": acc.n_tied})
    with pytest.raises(TypeError, match="incoming_state"):
        first.merge_state([acc.stats])
    assert_same_state(first, acc)  # a refused merge adds nothing


def test_bad_input_raises_and_keeps_the_state():
    (logits, targets), = make_batches(1)
    metric = CrossEntropyDecomposition(VOCAB)
    metric.update(logits, targets)
    before = metric.stats.clone()
    with pytest.raises(TypeError, match="targets"):
        metric.update(logits, targets.float())
    with pytest.raises(ValueError, match="columns"):
        metric.update(logits[..., :VOCAB - 1], targets[...])
    with pytest.raises(ValueError, match="shape"):
        metric.update(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="targets"):
        metric(logits, torch.full_like(targets, VOCAB))  # beyond the counted vocabulary
    bad = logits.clone()
    bad[0, 3, 7] = float("nan")
    # torchmetrics' own forward resets the state before updating: a failing batch would lose
    # everything accumulated. This one must not.
    with pytest.raises(ValueError, match="non-finite"):
        metric(bad, targets)
    assert torch.equal(metric.stats, before)
    with pytest.raises(ValueError, match="nothing to decompose"):
        metric(logits, torch.full_like(targets, -100))
    assert torch.equal(metric.stats, before)

    with pytest.raises(ValueError, match="ties"):
        CrossEntropyDecomposition(VOCAB, ties="optimistic")
    with pytest.raises(ValueError, match="backend"):
        CrossEntropyDecomposition(VOCAB, backend="fast")
    with pytest.raises(TypeError, match="vocab_size"):
        CrossEntropyDecomposition(float(VOCAB))
    with pytest.raises(ValueError, match="vocab_size"):
        CrossEntropyDecomposition(0)
    with pytest.raises(TypeError, match="ignore_index"):
        CrossEntropyDecomposition(VOCAB, ignore_index=None)
    with pytest.raises(ValueError, match="check_finite"):
        CrossEntropyDecomposition(VOCAB, validate=False)


def test_set_dtype_keeps_the_integer_state():
    metric = CrossEntropyDecomposition(VOCAB).set_dtype(torch.float16)
    assert metric.stats.dtype == torch.int64 and metric.n_tied.dtype == torch.int64


# Two processes, gloo on CPU. The worker is module-level so that spawn can import it.

def _ddp_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        batches = make_batches()
        mine = [b for i, b in enumerate(batches) if i % world_size == rank]
        out = {}

        # A dist_sync_fn of the user's own keeps torchmetrics' gather-then-sum path.
        gathered = CrossEntropyDecomposition(
            VOCAB, dist_sync_fn=lambda t, group=None: gather_all_tensors(t, group))
        for logits, targets in mine:
            gathered.update(logits, targets)
        out["gathered"] = gathered.compute()

        # From here on, gathering is forbidden and every all_reduce is recorded.
        def forbidden(*args, **kwargs):
            raise AssertionError("the metric's sync gathered instead of reducing")
        for name in ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather",
                     "gather_object", "_all_gather_base"):
            if hasattr(dist, name):
                setattr(dist, name, forbidden)
        reduced_sizes = []
        all_reduce = dist.all_reduce

        def recording_all_reduce(tensor, *args, **kwargs):
            reduced_sizes.append(tensor.numel())
            return all_reduce(tensor, *args, **kwargs)
        dist.all_reduce = recording_all_reduce

        metric = CrossEntropyDecomposition(VOCAB)
        out["forward"] = metric(*mine[0])  # the local batch value: no sync on step
        for logits, targets in mine[1:]:
            metric.update(logits, targets)
        out["sizes_before_compute"] = list(reduced_sizes)
        out["result"] = metric.compute()
        out["sizes_compute"] = list(reduced_sizes)
        out["local_after_compute"] = metric.stats.clone()  # unsynced again
        out["decomposition"] = metric.decomposition().as_dict()
        metric.sync()
        out["synced"] = (metric.stats.clone(), metric.n_tied.clone())
        metric.unsync()
        out["unsynced"] = (metric.stats.clone(), metric.n_tied.clone())

        # dist_sync_on_step: forward's value is over both processes' batches.
        stepped = CrossEntropyDecomposition(VOCAB, dist_sync_on_step=True)
        out["step_value"] = stepped(*mine[0])
        out["step_local"] = stepped.stats.clone()
        out["sizes_total"] = list(reduced_sizes)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_all_reduce_to_the_single_process_result(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
             nprocs=world_size, join=True)
    batches = make_batches()
    acc = accumulate(batches)
    d = acc.decompose()
    state_numel = 6 * VOCAB + 2  # stats and the two counters, packed into one all_reduce
    # Before it, a [world, 2] table (each process's vocab_size and ties_known in its own row)
    # in a SUM all_reduce: processes of different vocabularies raise together, naming who holds
    # which, instead of breaking the big collective.
    agree = [2 * world_size, state_numel]
    for rank in range(world_size):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        mine = [b for i, b in enumerate(batches) if i % world_size == rank]
        local = accumulate(mine)

        assert_result_equals(out["result"], d, acc.tie_rate)
        assert_result_equals(out["gathered"], d, acc.tie_rate)
        assert out["decomposition"] == d.as_dict()
        assert out["sizes_before_compute"] == []
        assert out["sizes_compute"] == agree  # one collective for all states

        assert torch.equal(out["synced"][0], acc.stats)
        assert out["synced"][1].item() == acc.n_tied.item()
        assert torch.equal(out["local_after_compute"], local.stats)
        assert torch.equal(out["unsynced"][0], local.stats)
        assert out["unsynced"][1].item() == local.n_tied.item()

        first = accumulate(mine[:1])
        assert_result_equals(out["forward"], first.decompose(), first.tie_rate)
        both = accumulate([batches[0], batches[1]])
        assert_result_equals(out["step_value"], both.decompose(), both.tie_rate)
        assert torch.equal(out["step_local"], first.stats)
        # compute, decomposition, sync and the synced forward: one all_reduce each.
        assert out["sizes_total"] == agree * 4
