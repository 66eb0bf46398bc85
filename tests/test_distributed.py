"""torch.distributed: RankAccumulator.all_reduce, vocabulary-parallel token_stats, and a sharded
`rankops eval`, each against the single-process result. Two processes on the gloo backend (CPU).

One spawn runs every collective case and saves what each process got; the tests compare that
with the same computation done here in one process. Every input is rebuilt here from the same
seeds, never read back from the workers."""
import datetime
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rankops
import rankops.cli
import rankops.ops.vocab_parallel
from rankops.accumulate import COUNT, COUNT_PESS

WORLD = 2
V = 1031  # odd, so no shard split is even
FP32_EPS = torch.finfo(torch.float32).eps
# logp of a vocab-parallel token vs the unsharded kernel: the shards' sums of exp add in another
# order, so they agree to fp32 rounding; we allow 4 eps relative to max(|logp|, 1) (a few ulp).
LOGP_ULPS = 4


def logp_tolerance(logp):
    return LOGP_ULPS * FP32_EPS * logp.double().abs().clamp(min=1.0)


# ---------------------------------------------------------------- the inputs, rebuilt anywhere

def batch(seed, n_rows, n_cols, dtype=torch.float32, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n_rows, n_cols, generator=g)
    targets = torch.randint(0, n_cols, (n_rows,), generator=g)
    targets[::7] = ignore_index
    targets[1], targets[2] = 0, n_cols - 1  # the first and last column
    return logits.to(dtype), targets


def tied_bf16(seed, n_rows, n_cols):
    """bf16 logits on a coarse grid: most targets tie with a competitor."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(-8, 9, (n_rows, n_cols), generator=g) / 4).to(torch.bfloat16)
    targets = torch.randint(0, n_cols, (n_rows,), generator=g)
    targets[::5] = -1
    return logits, targets


def vocab_parallel_cases():
    """name -> (full logits, targets, [(vocab_start, stop)] per process, token_stats kwargs)."""
    cases = {}
    logits, targets = batch(1, 40, V)
    cases["uneven"] = (logits, targets, [(0, 300), (300, V)], {})
    # A padded output layer: columns 1000..1039 are padding and hold the largest logits, so a
    # shard that counted them would be caught.
    logits, targets = batch(2, 40, 1040)
    logits[:, 1000:] = 50.0
    targets = torch.where(targets >= 1000, 999, targets)
    cases["padded"] = (logits, targets, [(0, 520), (520, 1040)], {"vocab_size": 1000})
    cases["padding_shard"] = (logits, targets, [(0, 1000), (1000, 1040)], {"vocab_size": 1000})
    cases["swapped_order"] = (logits, targets, [(520, 1040), (0, 520)], {"vocab_size": 1000})
    logits, targets = tied_bf16(3, 48, V)
    cases["bf16_ties"] = (logits, targets, [(0, 517), (517, V)], {"ignore_index": -1})
    logits, targets = batch(4, 30, V, torch.float16)
    cases["fp16"] = (logits, targets, [(0, 11), (11, V)], {})
    logits, targets = batch(5, 30, V, torch.float64)
    cases["fp64"] = (logits, targets, [(0, 700), (700, V)], {})
    # [B, T-1, V] sliced from [B, T, V]: rows cannot be flattened into a view.
    logits, targets = batch(6, 3 * 9, V)
    logits = logits.view(3, 9, V)[:, :-1]
    cases["strided_3d"] = (logits, targets.view(3, 9)[:, :-1], [(0, 600), (600, V)], {})
    # -inf logits (masked tokens) with check_finite=False: IEEE semantics as the kernel's.
    logits, targets = batch(7, 30, V)
    logits[3:9, 100:700] = float("-inf")
    cases["minus_inf"] = (logits, targets, [(0, 400), (400, V)], {"check_finite": False})
    # NaN with check_finite=False: in a competitor's column (logp NaN, rank and ties still
    # count the other columns) and as the target logit itself (rank 0, ties 0, logp NaN).
    logits, targets = batch(8, 20, V)
    logits[4, 900] = float("nan")
    targets[4] = 10
    logits[5, int(targets[5])] = float("nan")
    logits[6, 3] = float("inf")  # logp -inf on every backend, as torch.logsumexp has it
    cases["nan"] = (logits, targets, [(0, 400), (400, V)], {"check_finite": False})
    return cases


def shard(logits, bounds):
    start, stop = bounds
    return logits[..., start:stop]


def accumulator_batches(rank):
    """What each process accumulates: its own batches (process r gets batches r, r + 2, ...)."""
    return [(seed, dtype) for i, (seed, dtype) in enumerate(
        [(10, torch.float32), (11, torch.bfloat16), (12, torch.float32), (13, torch.bfloat16), (14, torch.float32)])
        if i % WORLD == rank]


def accumulate_alone(acc, seed, dtype):
    logits, targets = tied_bf16(seed, 64, V) if dtype == torch.bfloat16 else batch(seed, 64, V)
    # The reference backend: the kernels' first call in a process costs seconds of imports.
    acc.update(logits, targets, ignore_index=-1 if dtype == torch.bfloat16 else -100, backend="torch")


def accumulator_vp_batches():
    """Batches for a vocab-parallel RankAccumulator(1000): padded columns past 1000 (the
    accumulator's vocab_size by default), then bf16 ties with an explicit vocab_size."""
    logits, targets, bounds, _ = vocab_parallel_cases()["padded"]
    tied, tied_targets = tied_bf16(8, 48, 1040)
    tied_targets = torch.where(tied_targets >= 1000, 999, tied_targets)
    return [(logits, targets, bounds, {}),
            (tied, tied_targets, [(0, 333), (333, 1040)], {"vocab_size": 1000, "ignore_index": -1})]


def mark_skipped(acc):
    """Tokens left out by update(validate=False) count in n_skipped; set it directly, since the
    CPU kernel leaves out its whole batch without counting (reported separately)."""
    acc.n_skipped += 3


# ---------------------------------------------------------------- the workers

def error_cases(rank):
    """name -> a call for this process that must raise on every process of the group."""
    logits, targets = batch(30, 12, 1000)
    halves = [(0, 500), (500, 1000)]
    mine = shard(logits, halves[rank])

    def vp(local, tgt=targets, **kw):
        kw.setdefault("vocab_start", halves[rank][0])
        return lambda: rankops.token_stats_vocab_parallel(local, tgt, **kw)

    bad_targets = targets.clone()
    bad_targets[4] = 1000
    other_targets = targets.clone()
    other_targets[5] = (int(targets[5]) + 1) % 1000 if rank == 1 else targets[5]
    nonfinite = mine.clone()
    if rank == 1:
        nonfinite[6, 3] = float("inf")
    return {
        "negative_vocab_start": vp(mine, vocab_start=-1 if rank == 1 else 0),
        "overlap": vp(shard(logits, [(0, 600), (500, 1000)][rank]), vocab_start=[0, 500][rank]),
        "gap": vp(shard(logits, [(0, 400), (500, 1000)][rank]), vocab_start=[0, 500][rank]),
        "not_from_zero": vp(shard(logits, [(100, 500), (500, 1000)][rank]), vocab_start=[100, 500][rank]),
        "target_out_of_range": vp(mine, bad_targets),
        "targets_differ": vp(mine, other_targets),
        "vocab_size_differs": vp(mine, vocab_size=1000 - rank),
        "vocab_size_too_large": vp(mine, vocab_size=1001),
        "nonfinite": vp(nonfinite),
        "float_targets": vp(mine, targets.float()),
        "mixed_devices": vp(mine, targets.to("meta") if rank == 0 else targets),
        "all_reduce_vocab_differs": lambda: rankops.RankAccumulator(V + rank).all_reduce(),
        "accumulator_vocab_size_too_large": lambda: rankops.RankAccumulator(1000).update_vocab_parallel(
            mine, targets, vocab_start=halves[rank][0], vocab_size=1001),
        # Wrong on one process only: it must not raise before the collective the other entered.
        "accumulator_vocab_size_one_sided": lambda: rankops.RankAccumulator(1000).update_vocab_parallel(
            mine, targets, vocab_start=halves[rank][0], vocab_size=1001 if rank == 0 else None),
        "vocab_start_2_pow_63": vp(mine, vocab_start=2 ** 63 if rank == 1 else 0),
        "check_finite_differs": vp(mine, check_finite=rank == 0),
        "meta_logits_one_sided": vp(mine.to("meta") if rank == 0 else mine),
        "metric_vocab_differs": lambda: metric_compute(V + rank),
    }


def metric_compute(vocab_size):
    from rankops.integrations.torchmetrics import CrossEntropyDecomposition
    metric = CrossEntropyDecomposition(vocab_size)
    metric.update(*batch(31, 8, vocab_size))
    return metric.compute()


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails, late
    torch.set_num_threads(1)
    # Chunks of a few rows, so the row chunking is exercised.
    rankops.ops.vocab_parallel.CHUNK_ELEMENTS = 2000
    got = {"vp": {}, "errors": {}}

    for name, (logits, targets, bounds, kwargs) in vocab_parallel_cases().items():
        s = rankops.token_stats_vocab_parallel(shard(logits, bounds[rank]), targets,
                                               vocab_start=bounds[rank][0], **kwargs)
        got["vp"][name] = s._asdict()

    acc = rankops.RankAccumulator(V)
    for seed, dtype in accumulator_batches(rank):
        accumulate_alone(acc, seed, dtype)
    if rank == 1:
        mark_skipped(acc)
    got["all_reduce_returns_self"] = acc.all_reduce() is acc
    got["all_reduce"] = acc.state_dict()

    no_ties = rankops.RankAccumulator(V)
    logits, targets = batch(40 + rank, 16, V)
    s = rankops.token_stats(logits, targets, backend="torch")
    no_ties.update_stats(s.rank, s.logp, ties=s.ties if rank == 0 else None)
    got["ties_known"] = no_ties.all_reduce().ties_known

    acc_vp = rankops.RankAccumulator(1000)
    for logits, targets, bounds, kwargs in accumulator_vp_batches():
        acc_vp.update_vocab_parallel(shard(logits, bounds[rank]), targets, vocab_start=bounds[rank][0], **kwargs)
    got["accumulator_vp"] = acc_vp.state_dict()

    got["error_seconds"] = {}
    importlib.import_module("rankops.integrations.torchmetrics")  # imported before the clock starts
    for name, call in error_cases(rank).items():
        start = time.monotonic()
        try:
            call()
            got["errors"][name] = None
        except Exception as exc:  # noqa: BLE001 - recorded and judged by the test
            got["errors"][name] = (type(exc).__name__, str(exc))
        got["error_seconds"][name] = time.monotonic() - start
    got["still_in_step"] = rankops.RankAccumulator(3).all_reduce().n_tokens  # no process left behind
    torch.save(got, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("spawned")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------- all_reduce

def test_all_reduce_equals_one_process(spawned):
    want = rankops.RankAccumulator(V)
    for rank in range(WORLD):
        for seed, dtype in accumulator_batches(rank):
            accumulate_alone(want, seed, dtype)
    mark_skipped(want)
    assert int(want.n_tied) > 0 and int(want.n_skipped) == 3
    for got in spawned:
        state = got["all_reduce"]
        assert got["all_reduce_returns_self"]
        assert torch.equal(state["stats"], want.stats)  # bit for bit
        assert torch.equal(state["n_tied"], want.n_tied)
        assert torch.equal(state["n_skipped"], want.n_skipped)


def test_all_reduce_ties_known_only_if_everywhere(spawned):
    assert [got["ties_known"] for got in spawned] == [False, False]


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        rankops.RankAccumulator(5).all_reduce()
    logits, targets = batch(0, 4, 10)
    with pytest.raises(RuntimeError, match="not initialised"):
        rankops.token_stats_vocab_parallel(logits, targets, vocab_start=0)


# ---------------------------------------------------------------- vocab-parallel token_stats

@pytest.mark.parametrize("name", list(vocab_parallel_cases()))
def test_vocab_parallel_equals_unsharded(spawned, name):
    logits, targets, _, kwargs = vocab_parallel_cases()[name]
    # The reference backend (the definition) where the C++ kernel differs: float64, and +inf.
    backend = "torch" if logits.dtype == torch.float64 or name == "nan" else "auto"
    want = rankops.token_stats(logits, targets, backend=backend, **kwargs)
    truth = rankops.token_stats(logits.double(), targets, backend="torch", **kwargs)
    for got in spawned:
        s = got["vp"][name]
        assert torch.equal(s["rank"], want.rank)
        assert torch.equal(s["ties"], want.ties)
        assert s["logp"].dtype == want.logp.dtype and s["logp"].shape == want.logp.shape
        finite = torch.isfinite(want.logp)
        assert torch.equal(torch.isfinite(s["logp"]), finite)
        torch.testing.assert_close(s["logp"][~finite], want.logp[~finite], equal_nan=True, rtol=0, atol=0)
        if logits.dtype == torch.float64:
            torch.testing.assert_close(s["logp"], want.logp, rtol=0, atol=1e-12)
            continue
        err = (s["logp"].double() - want.logp.double()).abs()[finite]
        assert (err <= logp_tolerance(want.logp)[finite]).all(), float(err.max())
        # And no worse against float64 truth than the unsharded kernel, up to one rounding.
        err_vp = (s["logp"].double() - truth.logp).abs()[finite].max()
        err_kernel = (want.logp.double() - truth.logp).abs()[finite].max()
        assert err_vp <= err_kernel + FP32_EPS * truth.logp[finite].abs().max()
    if name == "bf16_ties":
        assert (want.ties > 0).float().mean() > 0.5  # the case is about ties


def test_vocab_parallel_accumulator_decomposes_as_unsharded(spawned):
    want = rankops.RankAccumulator(1000)
    for logits, targets, _, kwargs in accumulator_vp_batches():
        want.update(logits, targets, ignore_index=kwargs.get("ignore_index", -100))
    for got in spawned:
        acc = rankops.RankAccumulator(1000)
        acc.load_state_dict(got["accumulator_vp"])
        assert torch.equal(acc.stats[COUNT], want.stats[COUNT])
        assert torch.equal(acc.stats[COUNT_PESS], want.stats[COUNT_PESS])
        assert int(acc.n_tied) == int(want.n_tied) > 0
        for ties in ("strict", "pessimistic"):
            d, w = acc.decompose(ties), want.decompose(ties)
            assert d.error_entropy == w.error_entropy  # from the counts alone
            for k in ("cross_entropy", "self_alignment", "confidence"):
                assert getattr(d, k) == pytest.approx(getattr(w, k), rel=1e-6, abs=1e-6), (ties, k)


# ---------------------------------------------------------------- bad input

ERRORS = {  # case -> (exception type, a phrase every process's message must hold)
    "overlap": ("ValueError", "vocab_start: the shards do not tile the vocabulary"),
    "gap": ("ValueError", "leaves columns [400, 500) uncovered"),
    "not_from_zero": ("ValueError", "leaves columns [0, 100) uncovered"),
    "target_out_of_range": ("ValueError", "targets must lie in [0, 1000)"),
    "targets_differ": ("ValueError", "targets differ between processes"),
    "vocab_size_differs": ("ValueError", "vocab_size differs between processes (process 0: 1000, process 1: 999)"),
    "vocab_size_too_large": ("ValueError", "vocab_size must be in [1, 1000]"),
    "nonfinite": ("ValueError", "non-finite"),
    "float_targets": ("TypeError", "targets must be an integer tensor"),
    "all_reduce_vocab_differs": ("ValueError", "vocab_size differs between processes (process 0: 1031, process 1: 1032)"),
    "accumulator_vocab_size_too_large": ("ValueError", "exceeds the accumulator's vocab_size"),
    "check_finite_differs": ("ValueError", "check_finite differs between processes (process 0: True, process 1: False)"),
    "metric_vocab_differs": ("ValueError", "vocab_size differs between processes (process 0: 1031, process 1: 1032)"),
}
# Cases where one process's own argument is wrong: it names it, the other says who failed.
ONE_SIDED = {
    "negative_vocab_start": (1, "vocab_start must be >= 0"),
    "mixed_devices": (0, "logits and targets must be on the same device"),
    "accumulator_vocab_size_one_sided": (0, "exceeds the accumulator's vocab_size"),
    "vocab_start_2_pow_63": (1, "vocab_start must be >= 0 (and below 2^62)"),
    "meta_logits_one_sided": (0, "logits must be a dense (strided) tensor on a CPU or CUDA device"),
}


@pytest.mark.parametrize("name", sorted(ERRORS) + sorted(ONE_SIDED))
def test_bad_input_raises_on_every_process(spawned, name):
    for rank, got in enumerate(spawned):
        raised = got["errors"][name]
        assert raised is not None, f"process {rank} did not raise"
        if name in ERRORS:
            assert raised[0] == ERRORS[name][0], raised
            assert ERRORS[name][1] in raised[1], raised
        elif rank == ONE_SIDED[name][0]:
            assert ONE_SIDED[name][1] in raised[1], raised
        else:
            assert raised == ("ValueError", f"process(es) [{ONE_SIDED[name][0]}] of the group rejected their "
                              "arguments to token_stats_vocab_parallel (see their error); nothing was computed")
        # A process left waiting would sit out the group's 60 s timeout; half of it is a wide
        # margin for a loaded machine, and far below torch's default of 30 minutes.
        assert got["error_seconds"][name] < 30, f"process {rank} waited {got['error_seconds'][name]:.0f} s"
    assert [got["still_in_step"] for got in spawned] == [0, 0]


# ---------------------------------------------------------------- sharded `rankops eval`

WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from "
         "or have an they which one you were her all she there would their we him been has when").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g)) + "."
            for n in torch.randint(1, 50, (24,), generator=g)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                     eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer) + 5, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    root = tmp_path_factory.mktemp("eval")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "docs").mkdir()
    for i, d in enumerate(docs):
        (root / "docs" / f"{i:02d}.txt").write_text(d)
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_args(root, out, extra=()):
    return ["eval", "--model", str(root / "model"), "--corpus", str(root / "docs"), "--context-length", "12",
            "--batch-size", "2", "--max-tokens", "all", "--no-progress", "--device", "cpu",
            "--output-path", str(out), *extra]


def eval_here(root, out, extra=()):
    """`rankops eval` in this process, on one thread as the launched processes run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rankops.cli.main(eval_args(root, out, extra))
    finally:
        torch.set_num_threads(threads)


def launch_eval(root, out, world, extra=(), kill_after_batches=None):
    """`python -m rankops eval` as torchrun would start it: one process per rank, env:// init.
    With kill_after_batches=N each process dies (status 137) right after checkpointing N batches."""
    command = ["-m", "rankops"] if kill_after_batches is None else \
        [str(Path(__file__).with_name("kill_after_checkpoint.py")), str(kill_after_batches)]
    args = [sys.executable, *command, *eval_args(root, out, extra)]
    base = dict(os.environ, OMP_NUM_THREADS="1")  # one thread each, as torchrun sets
    port = str(free_port())
    return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def finish(procs):
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


def measured(results):
    """Everything measured: the results without the date, timings and path."""
    return {k: v for k, v in results.items() if k not in ("date", "timings", "path")}


def test_sharded_eval_equals_one_process(tiny_model, tmp_path, capsys):
    # Killed after each process checkpointed its first batch, then resumed.
    killed = launch_eval(tiny_model, tmp_path / "killed", WORLD, extra=["--checkpoint-every", "0"],
                         kill_after_batches=1)
    sharded = launch_eval(tiny_model, tmp_path / "sharded", WORLD)
    codes, outs = finish(killed)
    assert codes == [137, 137], outs
    run_dir = next((tmp_path / "killed").glob("*/*"))
    assert sorted(p.name for p in run_dir.glob("checkpoint*.pt")) == ["checkpoint.rank0of2.pt", "checkpoint.rank1of2.pt"]
    resumed = launch_eval(tiny_model, tmp_path / "killed", WORLD, extra=["--resume"])
    assert eval_here(tiny_model, tmp_path / "single") == 0
    codes, outs = finish(sharded + resumed)
    assert codes == [0] * 2 * WORLD, outs
    # Only process 0 prints the table.
    assert "| model |" in outs[0][0] and "| model |" not in outs[1][0]

    def read(out):
        run = next((tmp_path / out).glob("*/*"))
        return (json.loads((run / "results.json").read_text()),
                torch.load(run / "accumulator.pt", weights_only=True), sorted(p.name for p in run.iterdir()))
    want, want_acc, files = read("single")
    assert files == ["accumulator.pt", "results.json"]
    assert want["n_tokens"] > 100 and want["protocol"]["n_windows"] > 4 * WORLD
    for out in ("sharded", "killed"):
        got, got_acc, got_files = read(out)
        assert got_files == files  # no checkpoint left behind
        assert measured(got) == measured(want), out  # floats compared exactly
        assert torch.equal(got_acc["stats"], want_acc["stats"]) and torch.equal(got_acc["n_tied"], want_acc["n_tied"])
        assert got["timings"]["processes"] == WORLD


def test_resume_with_another_process_count_is_refused(tiny_model, tmp_path, capsys):
    run_dir = tmp_path / "model" / "docs"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.rank0of2.pt").write_bytes(b"")
    assert eval_here(tiny_model, tmp_path, extra=["--resume"]) == 2
    assert "another number of processes" in capsys.readouterr().err
