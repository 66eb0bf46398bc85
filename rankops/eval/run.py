"""The evaluation loop of `rankops eval`: stream batches through a model, accumulate the
per-rank statistics with the fused kernels (never a full log-softmax), checkpoint, resume, and
write results.

Files, per model and corpus, under OUTPUT/<model>/<corpus>/:
    results.json       the decomposition and everything needed to interpret it (atomic write)
    accumulator.pt     the RankAccumulator state, for re-analysis (rankops.RankAccumulator.load_state_dict)
    checkpoint.pt      while running: the accumulator and how many windows are done
                       (checkpoint.rank<R>of<W>.pt per process in a sharded run)
A killed run continues with resume=True from its last checkpoint and ends with exactly (bit for
bit) the result of an uninterrupted run: the accumulator's sums are integers, so how the
stream was split does not matter.

Sharded (distributed=True, as `rankops eval` does under torchrun): every process plans the same
windows and cuts them into the same batches as a single process would; batch j goes to process
j % world_size. Each accumulates and checkpoints its own batches; the accumulators are then
summed by one all-reduce and process 0 writes the files. The same batches are computed as in a
single-process run, so the results are bit-identical wherever the model's forward pass is
deterministic for a given batch.
"""
import datetime
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Optional

import torch

import rankops
from rankops.accumulate import RankAccumulator
from rankops.eval.corpora import Corpus
from rankops.eval.models import LoadedModel
from rankops.eval.windows import Plan, Protocol, collate, plan_windows

RESULTS_FORMAT = 1
# Test hook: a hard exit once this many windows are checkpointed (tests/test_eval.py).
_FAULT_AFTER_WINDOWS = int(os.environ["RANKOPS_FAULT_AFTER_WINDOWS"]) if "RANKOPS_FAULT_AFTER_WINDOWS" in os.environ else None


class EvalError(ValueError):
    """An evaluation that cannot start or continue, with the reason."""


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def run_identity(lm: LoadedModel, corpus: Corpus, protocol: Protocol, plan: Plan) -> dict:
    return {"model": lm.source, "corpus": corpus.source, "protocol": protocol.as_dict(),
            "vocab_size": lm.vocab_size, "stream": plan.fingerprint()}


def evaluate(lm: LoadedModel, corpus: Corpus, protocol: Protocol = Protocol(), *,
             output_path: Optional[str] = None, resume: bool = False, backend: str = "auto",
             device: Optional[str] = None, max_batch_tokens: int = 8192,
             checkpoint_every_s: float = 60.0, progress: bool = True, distributed: bool = False) -> dict:
    """Decomposes lm's cross-entropy on corpus under protocol; returns the results dict (and
    writes it under output_path, if given). distributed=True shards the batches over the
    processes of the (initialised) default torch.distributed group; every process returns the
    results, process 0 writes them."""
    context_length = protocol.context_length or lm.context_length
    try:
        plan = plan_windows(corpus.documents, lm.tokenizer, protocol, context_length)
    except ValueError as exc:
        raise EvalError(f"corpus {corpus.name!r}: {exc}") from exc
    if device is None:
        device = next((p.device for p in lm.model.parameters()), torch.device("cpu")) \
            if isinstance(lm.model, torch.nn.Module) else torch.device("cpu")
    identity = run_identity(lm, corpus, protocol, plan)
    rank, world_size = 0, 1
    shard = None  # a sharded run's own batches, as (first window, windows) pairs
    if distributed:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise EvalError("distributed=True needs an initialised torch.distributed process group")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        shard = list(batches(plan.windows, 0, max_batch_tokens, protocol.batch_size))[rank::world_size]
        # The batches depend on max_batch_tokens: a resumed shard must cut them the same way.
        identity = dict(identity, shard={"rank": rank, "world_size": world_size,
                                         "max_batch_tokens": max_batch_tokens})
    progress_key = "windows_done" if shard is None else "shard_batches_done"

    out_dir = checkpoint = None
    acc, done, timings = RankAccumulator(lm.vocab_size, device=device), 0, {"forward_s": 0.0, "metric_s": 0.0}
    if output_path is not None:
        out_dir = Path(output_path) / safe_name(lm.name) / safe_name(corpus.name)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(out_dir / ".writable", b"")
        except OSError as exc:
            raise EvalError(f"cannot write results to {out_dir}: {exc}") from exc
        checkpoint = out_dir / checkpoint_name(rank, world_size)
        if resume:
            ours = {checkpoint_name(r, world_size) for r in range(world_size)}
            others = sorted(p.name for p in out_dir.glob("checkpoint*.pt") if p.name not in ours)
            if others:
                raise EvalError(f"{out_dir} holds checkpoints of a run with another number of "
                                f"processes ({', '.join(others)}); resume with that number or remove them")
        if resume and checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True)
            if state["identity"] != identity:
                raise EvalError(f"{checkpoint} was written by a different run (model, corpus, "
                                "protocol or token stream differ); remove it or drop --resume")
            acc.load_state_dict(state["accumulator"])
            done, timings = state[progress_key], state["timings"]

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        if shard is None:
            total, initial, desc = plan.n_scored_tokens, sum(w.n_scored for w in plan.windows[:done]), ""
        else:
            total = sum(w.n_scored for _, batch in shard for w in batch)
            initial = sum(w.n_scored for _, batch in shard[:done] for w in batch)
            desc = f" (process 0 of {world_size})"
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"{lm.name} on {corpus.name}{desc}",
                   initial=initial)
    pad_id = lm.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (lm.tokenizer.eos_token_id or 0)
    last_save = time.monotonic()
    started = time.monotonic()

    def save_checkpoint():
        save_atomic(checkpoint, {"identity": identity, "accumulator": acc.state_dict(),
                                 progress_key: done, "timings": timings})

    def work():
        """(progress after the batch, batch): windows done, or in a shard its batches done."""
        if shard is None:
            for start, batch in batches(plan.windows, done, max_batch_tokens, protocol.batch_size):
                yield start + len(batch), batch
        else:
            for k in range(done, len(shard)):
                yield k + 1, shard[k][1]

    try:
        with torch.no_grad():
            for next_done, batch in work():
                input_ids, attention_mask, labels = (t.to(device) for t in collate(batch, pad_id))
                t0 = time.perf_counter()
                logits = lm.logits(input_ids, attention_mask)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                acc.update(logits, labels, backend=backend)  # [B, T, V]: vocab truncated to the tokenizer's
                t2 = time.perf_counter()
                timings["forward_s"] += t1 - t0
                timings["metric_s"] += t2 - t1
                done = next_done
                if bar is not None:
                    bar.update(sum(w.n_scored for w in batch))
                if checkpoint is not None and time.monotonic() - last_save >= checkpoint_every_s:
                    save_checkpoint()
                    last_save = time.monotonic()
                    if _FAULT_AFTER_WINDOWS is not None and done >= _FAULT_AFTER_WINDOWS:
                        os._exit(137)  # tests: die like a SIGKILL, right after a checkpoint
    except BaseException:
        if checkpoint is not None and done > 0:
            save_checkpoint()  # keep what was measured: a KeyboardInterrupt or an error mid-run
        raise
    finally:
        if bar is not None:
            bar.close()
    timings["wall_s"] = timings.get("wall_s", 0.0) + time.monotonic() - started

    if shard is not None:
        from rankops.distributed import all_reduce_timings
        if checkpoint is not None:
            save_checkpoint()  # the whole shard: a run killed from here on resumes without recomputing
        acc.all_reduce()
        timings = all_reduce_timings(timings)  # process-seconds summed, the longest wall time
    results = build_results(lm, corpus, protocol, plan, context_length, acc, timings, backend)
    results["timings"]["processes"] = world_size
    if out_dir is not None:
        if rank == 0:
            save_atomic(out_dir / "accumulator.pt", acc.state_dict())
            write_atomic(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
            results["path"] = str(out_dir / "results.json")
        if shard is not None:
            dist.barrier()  # the results are on disk before any shard's checkpoint goes
        if checkpoint.exists():
            checkpoint.unlink()
        (out_dir / ".writable").unlink(missing_ok=True)
    return results


def checkpoint_name(rank: int, world_size: int) -> str:
    return "checkpoint.pt" if world_size == 1 else f"checkpoint.rank{rank}of{world_size}.pt"


def build_results(lm, corpus, protocol, plan, context_length, acc, timings, backend) -> dict:
    d, dp = acc.decompose(), acc.decompose("pessimistic")
    n_tokens = acc.n_tokens
    import transformers
    return {
        "format": RESULTS_FORMAT,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": lm.name, "source": lm.source, "family": lm.family, "step": lm.step,
                  "vocab_size": lm.vocab_size,
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
                     "backend": backend},
    }


def markdown_table(results: list) -> str:
    head = ("| model | step | corpus | tokens | CE | EE | SA | Conf | EE/CE | top-1 | MRR | ties |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        d = r["decomposition"]
        step = r["model"]["step"]
        rows.append(f"| {r['model']['name']} | {'-' if step is None else step} | {r['corpus']['name']} | "
                    f"{r['n_tokens']} | {d['cross_entropy']:.4f} | {d['error_entropy']:.4f} | "
                    f"{d['self_alignment']:.4f} | {d['confidence']:.4f} | {d['error_entropy_share']:.3f} | "
                    f"{d['top1_accuracy']:.3f} | {d['mean_reciprocal_rank']:.3f} | {r['tie_rate']:.3f} |")
    return "\n".join([head] + rows)
