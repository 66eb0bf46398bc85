"""The evaluation loop of `rankops eval`: stream batches through a model, accumulate the
per-rank statistics with the fused kernels (never a full log-softmax), checkpoint, resume, and
write results.

Two paths (choose_head; results["head"] says which ran and why): "fused", for models whose
logits are a plain linear map of the last hidden states (rankops.eval.models.linear_head),
runs the model without its output layer and scores the output layer block by block
(RankAccumulator.update_linear): no [B, T, V] logits are ever held, which is what lets a
262,144-word model read long windows; "logits" takes the model's own logits
(RankAccumulator.update). The two paths' logits can differ by rounding (other matmul shapes).

Files, per model and corpus, under OUTPUT/<model>/<corpus>/:
    results.json       the decomposition and everything needed to interpret it
    accumulator.pt     the RankAccumulator state, for re-analysis (rankops.RankAccumulator.load_state_dict)
    checkpoint.pt      while running: the accumulator and how many batches are done
                       (checkpoint.rank<R>of<W>.pt per process in a run of W processes)
Every file is written atomically (rankops.atomic). A killed run continues with resume=True from
its last checkpoint and ends with exactly (bit for bit) the result of an uninterrupted run: the
accumulator's sums are integers, so how the stream was split does not matter.

What a checkpoint guarantees (rankops.eval.checkpoint verifies it before a resume trusts it):
- Statistics and position from the same instant. Each batch is added to a copy of the
  statistics, and the copy and the position are committed together, in one assignment, once
  the batch is complete; a KeyboardInterrupt or an error at any moment (the interrupt handler
  checkpoints what was committed) leaves the last committed pair, never a batch without its
  position. A resumed run checks that the statistics hold exactly the tokens of the batches done.
- An identity: everything that changes the numbers (run_identity): model, corpus, protocol,
  the token stream, the batching (tokens per batch, process count and rank), the path (fused
  or logits), the model's dtype, the backend that runs (resolved: never "auto"), the device
  type with what selects its kernels (the CPU's instruction set for torch and for the cpu
  backend, the GPU's name), and the versions of rankops, torch and transformers. A resume
  with any of them different is refused, naming the fields.
- A digest and the accumulator's invariants, checked on resume: a corrupt, truncated, forged
  or foreign file is refused with one line naming it (EvalError), never used.
Temporary files that a killed write left in the run folder are removed when the run starts or
resumes (rankops.atomic.remove_stale_temporaries).

One loop serves one process or many (distributed=True, as `rankops eval` does under torchrun):
every process plans the same windows and cuts them into the same batches; batch j goes to
process j % world_size (all of them to a single process). Each accumulates and checkpoints its
own batches; the accumulators are then summed by one all-reduce and process 0 writes the files.
The same batches are computed as in a single-process run, so the results are bit-identical
wherever the model's forward pass is deterministic for a given batch.

evaluate() is that sequence of steps: plan, shard, resume, score, reduce, write.
"""
import datetime
import itertools
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Union

import torch

import rankops
from rankops import _ext
from rankops.accumulate import RankAccumulator
from rankops.atomic import remove_stale_temporaries, save_atomic, write_atomic
from rankops.eval.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from rankops.eval.corpora import Corpus
from rankops.eval.models import DTYPES, FusedHeadError, LinearHead, LoadedModel, linear_head
from rankops.eval.windows import Plan, Protocol, Window, collate, plan_windows
from rankops.eval.world import World
from rankops.ops.common import _resolve_linear_backend, resolve_backend

RESULTS_FORMAT = 1


class EvalError(ValueError):
    """An evaluation that cannot start or continue, with the reason."""


class CheckpointWritten(NamedTuple):
    """What `evaluate(on_checkpoint=...)` is told after each checkpoint it writes."""
    path: Path          # the checkpoint file, complete on disk
    batches_done: int   # this process's batches in it
    n_batches: int      # this process's batches in the whole run
    rank: int
    world_size: int


def safe_name(name: str) -> str:
    """name as one ordinary path component: letters, digits and ._- only, no leading or trailing
    dot or underscore (so never ".", ".." or a hidden name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def batches(windows, start: int, max_batch_tokens: int, max_batch_size: int):
    """Consecutive runs of windows whose padded size stays within max_batch_tokens."""
    i = start
    while i < len(windows):
        j, width = i, 0
        while j < len(windows) and j - i < max_batch_size:
            width_j = max(width, len(windows[j].tokens))
            if j > i and width_j * (j - i + 1) > max_batch_tokens:
                break
            width, j = width_j, j + 1
        yield i, windows[i:j]
        i = j


FUSED_HEAD_CHOICES = ("auto", "on", "off")


class HeadChoice(NamedTuple):
    """How the logits are scored: "fused" (the output layer's matmul block by block,
    linear_token_stats: no [N, V] tensor) or "logits" (the model's full logits), and why."""
    path: str                             # "fused" | "logits"
    reason: str
    linear: Optional[LinearHead] = None   # with path "fused"
    backend: Optional[str] = None         # with path "fused": linear_token_stats' backend, resolved


def _probe(lm: LoadedModel, device: torch.device) -> torch.Tensor:
    # The logits of a model of unknown dtype (a bare callable) are taken to be float32;
    # _check_backend refuses a batch whose logits would resolve differently.
    dtype = DTYPES.get(lm.dtype, torch.float64 if lm.dtype == "float64" else torch.float32)
    return torch.empty(0, 1, dtype=dtype, device=device)


def choose_head(lm: LoadedModel, fused_head: str, backend: str, device: torch.device) -> HeadChoice:
    """fused_head "on": the fused path, or an EvalError saying why the model cannot take it;
    "off": the logits; "auto": the fused path wherever the model's output layer is a plain
    linear map (rankops.eval.models.linear_head) and linear_token_stats runs the same kind of
    backend as the logits would (a kernel, or the reference for both), else the logits."""
    if fused_head not in FUSED_HEAD_CHOICES:
        raise EvalError(f"fused_head must be one of {FUSED_HEAD_CHOICES}, got {fused_head!r}")
    if fused_head == "off":
        return HeadChoice("logits", "fused head off")
    try:
        linear = linear_head(lm)
        resolved = _resolve_linear_backend(backend, _probe(lm, device))
    except (FusedHeadError, TypeError, ValueError) as exc:
        if fused_head == "on":
            raise EvalError(f"fused head on, but {lm.name} cannot take it: {exc}") from exc
        return HeadChoice("logits", str(exc))
    if fused_head == "auto" and resolved == "torch":
        try:
            logits_backend = resolve_backend(backend, _probe(lm, device))
        except (TypeError, ValueError):
            logits_backend = "torch"
        if logits_backend != "torch":
            return HeadChoice("logits", f"linear_token_stats has no kernel for {_probe(lm, device).dtype} on "
                                        f"{device.type}; the logits take backend {logits_backend!r}")
    return HeadChoice("fused", "the output layer is a plain linear map", linear, resolved)


def compute_identity(lm: LoadedModel, device: torch.device, backend: str,
                     head: HeadChoice = HeadChoice("logits", "")) -> dict:
    """What computes the numbers: the path (head.path: the model's logits or the fused output
    layer, whose logits can differ by rounding), the model's dtype, the backend resolved for
    that path, the device type and what selects its kernels, and the versions."""
    import transformers
    try:
        resolved = head.backend if head.path == "fused" else resolve_backend(backend, _probe(lm, device))
    except (TypeError, ValueError) as exc:
        raise EvalError(f"backend {backend!r}: {exc}") from exc
    compute = {"head": head.path, "dtype": lm.dtype, "backend": resolved, "device": device.type}
    if device.type == "cuda":
        compute["device_name"] = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        compute["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # torch's own kernels
    if resolved == "cpu":
        compute["cpu_isa"] = _ext.cpu_isa()  # the CPU kernels: not bit-identical across instruction sets
    compute["versions"] = {"rankops": str(rankops.__version__), "torch": str(torch.__version__),
                           "transformers": str(transformers.__version__)}  # plain str: torch's is a subclass
    return compute


def run_identity(lm: LoadedModel, corpus: Corpus, protocol: Protocol, plan: Plan, compute: dict) -> dict:
    """Everything that changes a run's numbers but the batching (see the module docstring)."""
    return {"model": lm.source, "corpus": corpus.source, "protocol": protocol.as_dict(),
            "vocab_size": lm.vocab_size, "stream": plan.fingerprint(), "compute": compute}


def checkpoint_name(rank: int, world_size: int) -> str:
    return "checkpoint.pt" if world_size == 1 else f"checkpoint.rank{rank}of{world_size}.pt"


def evaluate(lm: LoadedModel, corpus: Corpus, protocol: Protocol = Protocol(), *,
             output_path: Optional[str] = None, resume: bool = False, backend: str = "auto",
             device: Union[str, torch.device, None] = None, max_batch_tokens: int = 8192,
             checkpoint_every_s: float = 60.0, progress: bool = True, distributed: bool = False,
             on_checkpoint: Optional[Callable[[CheckpointWritten], None]] = None,
             fused_head: str = "auto") -> dict:
    """Decomposes lm's cross-entropy on corpus under protocol; returns the results dict (and
    writes it under output_path, if given).

    fused_head: "auto" | "on" | "off" (choose_head): score the output layer from the last hidden
    states block by block (RankAccumulator.update_linear, no [B, T, V] logits) or the model's
    logits; results["head"] says which ran and why.

    device: a torch.device or its name ("cpu", "cuda:1"); default: where the model is.
    distributed=True shards the batches over the processes of the (initialised) default
    torch.distributed group; every process returns the results, process 0 writes them.
    on_checkpoint(CheckpointWritten) is called after each checkpoint is complete on disk (with
    output_path only): every checkpoint_every_s seconds and once when the batches are done.
    """
    device = _device(lm, device)
    world = _world(distributed)
    head = choose_head(lm, fused_head, backend, device)  # before the corpus is tokenised: "on" may refuse
    compute = compute_identity(lm, device, backend, head)
    _stage(progress, world, f"{lm.name} on {corpus.name}: tokenising and cutting into windows")
    plan, context_length = _plan(lm, corpus, protocol)
    _stage(progress, world, f"{lm.name} on {corpus.name}: {plan.n_scored_tokens} tokens to score in "
                            f"{len(plan.windows)} windows of up to {context_length} tokens")
    work = world.shard([b for _, b in batches(plan.windows, 0, max_batch_tokens, protocol.batch_size)])
    # The batches depend on max_batch_tokens and the process count: a resumed run must cut them the same way.
    identity = dict(run_identity(lm, corpus, protocol, plan, compute),
                    shard={"rank": world.rank, "world_size": world.size, "max_batch_tokens": max_batch_tokens})
    out_dir = _open_run_dir(output_path, lm, corpus, world)
    checkpoints = _Checkpoints(out_dir, world, identity, work, checkpoint_every_s, on_checkpoint)
    run = _Progress(_Snapshot(RankAccumulator(lm.vocab_size, device=device), 0, _NO_TIME))
    if resume:
        run.committed = checkpoints.resume(run.committed)
    _score(lm, head, work, run, checkpoints, device, compute["backend"],
           _progress_bar(progress, world, f"{lm.name} on {corpus.name}", work, run.committed.batches_done))
    acc = run.committed.acc
    world.sum_accumulator(acc)
    timings = world.reduce_timings(dict(run.committed.timings))  # process-seconds summed, the longest wall time
    results = build_results(lm, corpus, protocol, plan, context_length, acc, timings, compute)
    results["head"] = {"path": head.path, "requested": fused_head, "reason": head.reason}
    results["timings"]["processes"] = world.size
    if out_dir is not None:
        _write_results(out_dir, results, acc, world)
        world.barrier()  # the results are on disk before any process's checkpoint goes
        checkpoints.remove()
        (out_dir / ".writable").unlink(missing_ok=True)
    return results


# -- the steps ------------------------------------------------------------------------------

_NO_TIME = {"forward_s": 0.0, "metric_s": 0.0}


class _Snapshot(NamedTuple):
    """What a checkpoint holds: the statistics and the position, from the same instant. Never
    changed once made (timings included): the next batch makes the next snapshot."""
    acc: RankAccumulator
    batches_done: int
    timings: dict


class _Progress:
    """The last committed snapshot. `committed` changes in one attribute store (the commit), so a
    KeyboardInterrupt, which Python raises between bytecodes, finds either snapshot, whole."""

    def __init__(self, committed: _Snapshot):
        self.committed = committed


def _device(lm: LoadedModel, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(lm.model, torch.nn.Module):
        return next((p.device for p in lm.model.parameters()), torch.device("cpu"))
    return torch.device("cpu")


def _world(distributed: bool) -> World:
    if not distributed:
        return World()
    try:
        return World.default_group()
    except ValueError as exc:
        raise EvalError(str(exc)) from exc


def _plan(lm: LoadedModel, corpus: Corpus, protocol: Protocol):
    context_length = protocol.context_length or lm.context_length
    try:
        return plan_windows(corpus.documents, lm.tokenizer, protocol, context_length), context_length
    except ValueError as exc:
        raise EvalError(f"corpus {corpus.name!r}: {exc}") from exc


def _open_run_dir(output_path: Optional[str], lm: LoadedModel, corpus: Corpus, world: World) -> Optional[Path]:
    """OUTPUT/<model>/<corpus>/, created, checked to lie inside OUTPUT whatever the names (and
    whatever symbolic links), cleared of temporary files that killed writes left, writable."""
    if output_path is None:
        return None
    root = Path(output_path)
    out_dir = root / safe_name(lm.name) / safe_name(corpus.name)
    try:
        _check_inside(out_dir, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_inside(out_dir, root)
        if world.rank == 0:  # before any process writes here: every temporary file is stale
            remove_stale_temporaries(out_dir)
        world.barrier()
        write_atomic(out_dir / ".writable", b"")
    except OSError as exc:
        raise EvalError(f"cannot write results to {out_dir}: {exc}") from exc
    return out_dir


def _check_inside(path: Path, root: Path) -> None:
    if root.resolve() not in path.resolve().parents:
        raise EvalError(f"refusing to write results to {path}: it resolves to {path.resolve()}, outside "
                        f"the output folder {root.resolve()}")


class _Checkpoints:
    """This process's checkpoint file: when to write it, reading it back, removing it. Without
    a run folder (no output_path) it keeps nothing."""

    def __init__(self, out_dir: Optional[Path], world: World, identity: dict, work: List[List[Window]],
                 every_s: float, on_checkpoint):
        self.out_dir, self.world, self.identity, self.n_batches = out_dir, world, identity, len(work)
        # tokens_after[k]: the tokens this process's first k batches score
        self.tokens_after = list(itertools.accumulate((sum(w.n_scored for w in b) for b in work), initial=0))
        self.path = None if out_dir is None else out_dir / checkpoint_name(world.rank, world.size)
        self.every_s, self.on_checkpoint = every_s, on_checkpoint
        self.last_save = time.monotonic()

    def resume(self, fresh: _Snapshot) -> _Snapshot:
        if self.path is None:
            return fresh
        ours = {checkpoint_name(r, self.world.size) for r in range(self.world.size)}
        others = sorted(p.name for p in self.out_dir.glob("checkpoint*.pt") if p.name not in ours)
        if others:
            raise EvalError(f"{self.out_dir} holds checkpoints of a run with another number of "
                            f"processes ({', '.join(others)}); resume with that number or remove them")
        if not (self.path.exists() or self.path.is_symlink()):
            return fresh
        try:
            saved = read_checkpoint(self.path, self.identity, self.n_batches, self.tokens_after.__getitem__)
            fresh.acc.load_state_dict(saved.accumulator)
        except (CheckpointError, TypeError, ValueError) as exc:
            raise EvalError(str(exc)) from exc
        return _Snapshot(fresh.acc, saved.batches_done, saved.timings)

    def save(self, state: _Snapshot, notify: bool = True) -> None:
        if self.path is None:
            return
        try:
            write_checkpoint(self.path, self.identity, state.acc.state_dict(), state.batches_done, state.timings)
        except OSError as exc:
            raise EvalError(f"cannot write the checkpoint {self.path}: {exc}") from exc
        self.last_save = time.monotonic()
        if notify and self.on_checkpoint is not None:
            self.on_checkpoint(CheckpointWritten(self.path, state.batches_done, self.n_batches,
                                                 self.world.rank, self.world.size))

    def save_if_due(self, state: _Snapshot) -> None:
        if time.monotonic() - self.last_save >= self.every_s:
            self.save(state)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _score(lm: LoadedModel, head: HeadChoice, work: List[List[Window]], progress: _Progress,
           checkpoints: _Checkpoints, device: torch.device, backend: str, bar) -> None:
    """Runs this process's batches from the committed position on, committing each whole batch:
    its statistics and position together (_Progress). backend: resolved (compute_identity).
    On the fused path forward_s times the model without its output layer and metric_s the
    output layer's matmuls with the statistics."""
    pad_id = lm.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (lm.tokenizer.eos_token_id or 0)
    started = time.monotonic()
    try:
        with torch.no_grad():
            for batch in work[progress.committed.batches_done:]:
                before = progress.committed
                input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, pad_id))
                t0 = time.perf_counter()
                if head.path == "fused":
                    hidden = head.linear.hidden_states(input_ids, attention_mask)  # [B, T, D]
                else:
                    logits = lm.logits(input_ids, attention_mask)  # [B, T, V]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                acc = before.acc.copy()  # the committed statistics stay as they are until the commit
                if head.path == "fused":  # vocab truncated to the tokenizer's, as below
                    acc.update_linear(hidden, head.linear.weight, labels, bias=head.linear.bias, backend=backend)
                else:
                    _check_backend(backend, logits)
                    acc.update(logits, labels, backend=backend)  # [B, T, V]: vocab truncated to the tokenizer's
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                timings = dict(before.timings, forward_s=before.timings["forward_s"] + t1 - t0,
                               metric_s=before.timings["metric_s"] + t2 - t1)
                progress.committed = _Snapshot(acc, before.batches_done + 1, timings)  # the commit
                bar.update(sum(w.n_scored for w in batch))
                checkpoints.save_if_due(progress.committed)
    except BaseException:
        # Keep what was measured (a KeyboardInterrupt or an error mid-run): the last commit only.
        if progress.committed.batches_done > 0:
            try:
                checkpoints.save(progress.committed, notify=False)
            except EvalError:
                pass  # the error that brought us here is the one to report
        raise
    finally:
        bar.close()
    done = progress.committed
    progress.committed = done._replace(timings=dict(done.timings, wall_s=done.timings.get("wall_s", 0.0)
                                                    + time.monotonic() - started))
    checkpoints.save(progress.committed)  # all of it: a run killed from here on resumes without recomputing


def _check_backend(backend: str, logits: torch.Tensor) -> None:
    """The backend resolved for the run (its identity) is the one these logits get."""
    try:
        resolved = resolve_backend("auto", logits)
    except (TypeError, ValueError):
        return  # update() says what is wrong with the logits
    if resolved == "torch" and backend != "torch":
        raise EvalError(f"the model's logits are {logits.dtype} on {logits.device}, which backend "
                        f"{backend!r} (the run's) cannot take; run with backend='torch'")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _stage(progress: bool, world: World, message: str) -> None:
    """A line on stderr saying what the run does before its bar starts (process 0 only)."""
    if progress and world.rank == 0:
        print(f"rankops eval: {message}", file=sys.stderr, flush=True)


class _LiveBar:
    """A tqdm bar of scored tokens that says which batch runs and redraws itself between updates
    (every second on a terminal, every 30 s in a log): one batch's forward pass takes up to a
    minute on a CPU, and a bar that only moves when a batch ends looks hung."""

    def __init__(self, bar, n_batches: int, batches_done: int, every_s: Optional[float] = None):
        self.bar, self.n_batches, self.batches_done = bar, n_batches, batches_done
        self._show_batch()
        bar.refresh()
        self._stop = threading.Event()
        if every_s is None:
            every_s = 1.0 if getattr(getattr(bar, "fp", None), "isatty", lambda: False)() else 30.0
        self._thread = threading.Thread(target=self._redraw, args=(every_s,),
                                        name="rankops-progress", daemon=True)
        self._thread.start()

    def _show_batch(self) -> None:
        running = self.batches_done < self.n_batches
        self.bar.set_postfix_str(f"batch {self.batches_done + 1}/{self.n_batches}" if running else "done",
                                 refresh=False)

    def _redraw(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.bar.refresh()  # the elapsed time moves while a batch runs

    def update(self, n: int) -> None:
        self.batches_done += 1
        self._show_batch()
        self.bar.update(n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


def _progress_bar(progress: bool, world: World, desc: str, work, batches_done: int):
    """A bar of scored tokens on process 0 (of its own batches, in a run of several)."""
    if not progress or world.rank != 0:
        return _NoBar()
    from tqdm.auto import tqdm
    if world.size > 1:
        desc += f" (process 0 of {world.size})"
    bar = tqdm(total=sum(w.n_scored for batch in work for w in batch), unit="tok", unit_scale=True,
               desc=desc, initial=sum(w.n_scored for batch in work[:batches_done] for w in batch))
    return _LiveBar(bar, len(work), batches_done)


def _write_results(out_dir: Path, results: dict, acc: RankAccumulator, world: World) -> None:
    if world.rank == 0:
        try:
            save_atomic(out_dir / "accumulator.pt", acc.state_dict())
            write_atomic(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
        except OSError as exc:
            raise EvalError(f"cannot write results to {out_dir}: {exc}") from exc
        results["path"] = str(out_dir / "results.json")


def build_results(lm, corpus, protocol, plan, context_length, acc, timings, compute) -> dict:
    """The results dict; compute: compute_identity's (what computed the numbers)."""
    d, dp = acc.decompose(), acc.decompose("pessimistic")
    n_tokens = acc.n_tokens
    import transformers
    return {
        "format": RESULTS_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": lm.name, "source": lm.source, "family": lm.family, "step": lm.step,
                  "vocab_size": lm.vocab_size, "dtype": lm.dtype,
                  "context_length": lm.context_length, "n_parameters": lm.n_parameters},
        "corpus": {"name": corpus.name, "source": corpus.source, "kind": corpus.kind,
                   "license": corpus.license, "n_documents_available": len(corpus.documents)},
        "protocol": dict(protocol.as_dict(), context_length_used=context_length,
                         windows=("lm-eval rolling (disjoint, each conditioned on the token before it)"
                                  if protocol.lm_eval_windows else "strided" if protocol.stride else "disjoint"),
                         bos=("lm-eval's prefix token (BOS, else EOS) before each document"
                              if protocol.lm_eval_windows
                              else "prepended to each document" if protocol.add_bos and lm.tokenizer.bos_token_id is not None
                              else "none"),
                         padding="right; padded positions ignored",
                         n_documents_selected=plan.n_documents,
                         n_documents_skipped_short=plan.n_documents_skipped,
                         n_windows=len(plan.windows)),
        "n_tokens": n_tokens,
        "decomposition": d.as_dict(),
        "decomposition_pessimistic": dp.as_dict(),
        "tie_rate": acc.tie_rate,
        "timings": dict(timings, tokens_per_s=n_tokens / max(timings["forward_s"] + timings["metric_s"], 1e-9),
                        metric_overhead=timings["metric_s"] / max(timings["forward_s"], 1e-9)),
        "versions": {"rankops": rankops.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "backend": compute["backend"]},  # the one that ran, never "auto"
        "compute": {k: v for k, v in compute.items() if k != "versions"},
    }


def cell(value, digits: int) -> str:
    """A table cell: value to `digits` decimals, or "-" where it is undefined (None in a results
    file: a share of CE when CE is 0, a model right on every token)."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list) -> str:
    head = ("| model | step | corpus | tokens | CE | EE | SA | Conf | EE/CE | top-1 | MRR | ties | head |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        d = r["decomposition"]
        step = r["model"]["step"]
        rows.append(f"| {r['model']['name']} | {'-' if step is None else step} | {r['corpus']['name']} | "
                    f"{r['n_tokens']} | {d['cross_entropy']:.4f} | {d['error_entropy']:.4f} | "
                    f"{d['self_alignment']:.4f} | {d['confidence']:.4f} | {cell(d['error_entropy_share'], 3)} | "
                    f"{d['top1_accuracy']:.3f} | {d['mean_reciprocal_rank']:.3f} | {r['tie_rate']:.3f} | "
                    f"{r.get('head', {}).get('path', 'logits')} |")
    return "\n".join([head] + rows)
