"""The token_stats benchmark: check every backend against the reference, then time it against
baselines measured in the same run. `rankops bench`, bench/bench_token_stats.py and
bench/gpu_suite.sh all run this code; bench/results/*.jsonl hold its rows.

Every case (dtype, N, V) is checked before anything is timed. The reference is the torch
backend, run on row chunks so that any case fits: each backend's ranks and ties must equal it
exactly, and its logp must lie within the bound the tests hold the kernels to, against float64
truth (`logp_bound`: G(V) u max(1, |logp|, |lse|), u = 2^-24, G(V) = 4 + 2 log2 V). The
accumulator's per-rank counts must equal the reference ranks' histogram, and each baseline must
compute what it claims. A disagreement raises CheckError: nothing of that case is timed.

Then all of a case's timings are interleaved round by round, so that ratios compare like with
like on a shared, noisy machine. On a GPU every call is timed alone with CUDA events after the
L2 cache is flushed (the few-row cases fit in L2), and the median of many calls is kept; on a CPU
a monotonic clock. The rankops calls are timed sync-free (check_finite=False, validate=False),
as a training or evaluation loop would run them.

Bytes counted per call: N*V*dtype_size for the logits, plus the per-row inputs and outputs
(targets 8 B; rank, ties 8 B each and logp 4 B for token_stats). Recorded per candidate: ms,
GB/s, the fraction of the pure-read bandwidth of the same run, speedups over the baselines, peak
extra device memory (allocator bytes beyond the inputs), and for acc_<backend>
(RankAccumulator.update) its time over token_stats alone.

Baselines (those that cannot run here are left out):
  read_amax      torch.amax over each row (one read of the logits)
  read_triton    a Triton row-max over the same logits, split across programs for few rows
  read_sum       torch.sum over the logits (CPU only)
  copy           a device-to-device copy of the logits; its bandwidth counts read + write
  torch          rankops' pure-torch reference backend, eager
  torch_compiled the reference backend under torch.compile
  ce_compiled    F.cross_entropy under torch.compile (loss only)
  liger          Liger-Kernel's cross-entropy forward (loss only, on a private copy), if installed
  serving_rank   the rank as serving engines compute it: fp32 log_softmax, then the count of
                 entries >= the target's (1-based; vLLM's V1 engine), under torch.compile
"read" in the ratios is the faster of read_amax and read_triton (on the CPU: of amax and sum).
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

import rankops
from rankops import _ext
from rankops.ops import reference
from rankops.ops.common import triton_interpreted
from rankops.ops.token_stats import TokenStats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The GPU cases of the performance issue: three shapes of 2^31 logits (the target is stated at
# 16384 x 131072), Llama 3's vocabulary, and few rows with a huge vocabulary (decoding, where the
# work must be split across the vocabulary to fill the GPU).
CUDA_SHAPES = [(16384, 131072), (32768, 65536), (8192, 262144), (8192, 128256), (1, 262144), (64, 262144)]


@dataclass(frozen=True)
class Profile:
    """Default cases and rounds: `quick` for `rankops bench` (about a minute on 2 CPU cores),
    `issue` for bench/bench_token_stats.py and the GPU suite (the issues' shapes)."""
    cpu_n: tuple
    cpu_v: tuple
    cuda_shapes: tuple
    cpu_repeat: int


PROFILES = {
    "quick": Profile(cpu_n=(1024,), cpu_v=(50304, 128256), cuda_shapes=((4096, 131072), (64, 262144)),
                     cpu_repeat=5),
    "issue": Profile(cpu_n=(2048,), cpu_v=(50304, 128256), cuda_shapes=tuple(CUDA_SHAPES), cpu_repeat=9),
}
ROW_BYTES = {"token_stats": 8 + 8 + 8 + 4, "accumulate": 8, "read": 0, "loss": 8}  # per row, beyond the logits
BASELINES = ("read_amax", "read_triton", "read_sum", "copy", "torch", "torch_compiled", "ce_compiled",
             "liger", "serving_rank")
DEFAULT_BASELINES = {"cpu": ("read_amax", "read_sum", "torch"), "cuda": BASELINES}
ON_DEVICE = {"cpu": ("cpu", "triton"), "cuda": ("cuda", "triton")}   # triton on a CPU: interpreted
REFERENCE_MAX_ELEMENTS = 2 ** 31  # the eager reference baseline materialises several [N, V] temporaries
CHUNK_ELEMENTS = 2 ** 24          # the checks' reference and float64 truth go in row chunks of this size
SYNC_FREE = dict(check_finite=False, validate=False)


class CheckError(RuntimeError):
    """A backend or a baseline disagrees with the reference: the case is not timed."""


@dataclass(frozen=True)
class BenchOptions:
    device: str                   # "cpu" or "cuda"
    backends: tuple               # rankops backends to check and time ("torch" is the reference)
    dtypes: tuple                 # names in DTYPES
    shapes: tuple                 # ((N, V), ...)
    baselines: tuple              # names in BASELINES
    accumulate: bool = True       # also check and time RankAccumulator.update
    compile_backend: str = "inductor"
    repeat: Optional[int] = None  # timed rounds; None: 5 or 9 on a CPU, 30 on a GPU (120 under 256 MB)
    json_path: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Checks


class Reference(NamedTuple):
    """The reference backend's rank and ties, and float64 truth for logp, on every row."""
    rank: torch.Tensor   # int64 [N]
    ties: torch.Tensor   # int64 [N]
    logp: torch.Tensor   # float64 [N], 0 where ignored
    lse: torch.Tensor    # float64 [N], 0 where ignored


def reference_stats(logits, targets, ignore_index: int = -100) -> Reference:
    """Row chunk by row chunk, so that a case of any size can be checked in full."""
    n_rows, n_cols = logits.shape
    step = max(1, CHUNK_ELEMENTS // n_cols)
    rank, ties, logp, lse = [], [], [], []
    for start in range(0, n_rows, step):
        z, t = logits[start:start + step], targets[start:start + step]
        ref = rankops.token_stats(z, t, ignore_index=ignore_index, backend="torch")
        keep = t != ignore_index
        z64 = z.double()
        row_lse = torch.logsumexp(z64, dim=-1)
        row_logp = z64.gather(-1, torch.where(keep, t, 0)[:, None])[:, 0] - row_lse
        rank.append(ref.rank), ties.append(ref.ties)
        logp.append(torch.where(keep, row_logp, 0.0)), lse.append(torch.where(keep, row_lse, 0.0))
        del z64
    return Reference(torch.cat(rank), torch.cat(ties), torch.cat(logp), torch.cat(lse))


def logp_bound(n_cols: int, logp, lse):
    """The largest error of a float32 logp against float64 truth that the tests accept
    (tests/test_token_stats.py, bound B): G(V) u max(1, |logp|, |lse|), G(V) = 4 + 2 log2 V, u = 2^-24."""
    growth = 4 + 2 * math.log2(n_cols)
    return 2.0 ** -24 * growth * torch.maximum(torch.maximum(logp.abs(), lse.abs()), torch.ones_like(logp))


def check_token_stats(backend: str, got: TokenStats, ref: Reference, n_cols: int) -> float:
    """Raises CheckError unless ranks and ties equal the reference's exactly and logp lies within
    logp_bound of float64 truth; returns the worst logp error as a fraction of its bound."""
    for name in ("rank", "ties"):
        mine, want = getattr(got, name).to(ref.rank.device), getattr(ref, name)
        bad = (mine != want).nonzero()
        if len(bad):
            row = int(bad[0])
            raise CheckError(f"backend {backend}: {name} differs from the reference on {len(bad)} of "
                             f"{len(want)} rows (first: row {row}, {int(mine[row])} instead of {int(want[row])})")
    keep = ref.rank >= 0
    logp = got.logp.to(ref.logp.device).double()
    err = (logp - ref.logp).abs()
    if bool((logp[~keep] != 0).any()):
        raise CheckError(f"backend {backend}: an ignored row's logp is not 0")
    if not bool(keep.any()):
        return 0.0
    frac = err[keep] / logp_bound(n_cols, ref.logp[keep], ref.lse[keep])
    worst = float(frac.max()) if frac.numel() else 0.0
    if not worst <= 1.0:  # NaN fails too
        row = int(keep.nonzero()[int(frac.argmax())])
        raise CheckError(f"backend {backend}: logp is {worst:.3g} x the allowed error away from float64 truth "
                         f"(row {row}: {float(logp[row]):.9g} instead of {float(ref.logp[row]):.9g})")
    return worst


def check_accumulate(backend: str, logits, targets, ref: Reference) -> None:
    """RankAccumulator.update on this backend, as users call it and as it is timed, must count
    exactly the reference's ranks (and rank + ties, by pessimistic rank)."""
    n_cols = logits.shape[-1]
    kept = ref.rank >= 0
    want = torch.bincount(ref.rank[kept], minlength=n_cols).cpu()
    want_pess = torch.bincount((ref.rank + ref.ties)[kept], minlength=n_cols).cpu()
    for flags in ({}, SYNC_FREE):
        acc = rankops.RankAccumulator(n_cols, device=logits.device)
        acc.update(logits, targets, backend=backend, **flags)
        if not (torch.equal(acc.count.cpu().to(torch.int64), want)
                and torch.equal(acc.count_pessimistic.cpu().to(torch.int64), want_pess)):
            raise CheckError(f"RankAccumulator.update(backend={backend!r}{', sync-free' if flags else ''}): "
                             f"the per-rank counts differ from the reference's ranks")


# ---------------------------------------------------------------------------------------------
# Timing


def _elapsed_ms(fn, device: str, flush=None) -> float:
    if device == "cuda":
        if flush is not None:
            flush()  # enqueued before the start event: it also hides the call's host overhead
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict, repeat: int, device: str, flush=None) -> dict:
    """Median ms of each fn after one warm-up call each, the fns taking turns every round.
    flush, if given, runs untimed before every timed call (an L2 flush on a GPU)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_elapsed_ms(fn, device, flush))
    return {name: statistics.median(v) for name, v in samples.items()}


def l2_flush(device: str):
    """A function that evicts the GPU's L2 cache by writing a buffer twice its size, or None."""
    if device != "cuda":
        return None
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    buf = torch.empty(max(2 * l2_bytes, 256 * 2**20), dtype=torch.uint8, device=device)
    return buf.zero_


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux). getrusage's
    ru_maxrss would not do: a spawned child inherits the parent's across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def host_peak_extra_mb(fn) -> float:
    """Peak resident memory of this process during fn() beyond what was resident before it, in
    MB (Linux): VmHWM, reset to the current resident set through /proc/self/clear_refs."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory would hide new allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) / 1024


def peak_extra_mb(fn, device: str):
    """Peak memory allocated by fn beyond what was allocated before it, in MB of 2^20 bytes (as
    host_peak_extra_mb's): the CUDA caching allocator's peak counter, reset just before; None
    on any other device."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ---------------------------------------------------------------------------------------------
# Cases and baselines


def make_case(n_rows: int, n_vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """logits [N, V] of scale 3 (as a language model's) and targets [N], every 17th ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n_rows, n_vocab, dtype=dtype, device=device)
    for start in range(0, n_rows, 1024):  # block by block: no fp32 temporary of the whole case
        block = logits[start:start + 1024]
        block.copy_(torch.randn(block.shape, generator=g, device=device) * 3.0)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g, device=device)
    targets[16::17] = -100  # a few ignored tokens, as padding produces (a row is kept when N < 17)
    return logits, targets


def serving_rank(logits, targets, ignore_index: int = -100):
    """The rank vLLM's V1 engine reports: 1-based, greater-or-equal, on fp32 log-probabilities
    (TokenStats.rank_as("vllm") on the logits, except where two logits round to one logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    keep = targets != ignore_index
    target_lp = logprobs.gather(-1, torch.where(keep, targets, 0)[:, None])
    return torch.where(keep, (logprobs >= target_lp).sum(dim=-1), -1)


def cross_entropy_loss(logits, targets):
    return F.cross_entropy(logits, targets, ignore_index=-100)


def liger_loss():
    """Liger-Kernel's fused cross-entropy, loss only, or None where it is not installed. On an
    input that does not require grad its forward writes no gradient; it still gets a private copy."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    return lambda logits, targets: liger_cross_entropy(logits, targets, ignore_index=-100)


class Baseline(NamedTuple):
    fn: Callable
    bytes_moved: int
    check: Optional[Callable]   # raises CheckError if fn's result is wrong


def baselines(device, names, logits, targets, n_cols, compile_backend, ref: Reference):
    """name -> Baseline for the names that can run here."""
    n_rows = logits.shape[0]
    nbytes = logits.numel() * logits.element_size()
    kept = ref.rank >= 0
    want_loss = float(-ref.logp[kept].mean()) if bool(kept.any()) else 0.0
    out = {}
    compile_ = lambda fn: torch.compile(fn, backend=compile_backend, dynamic=False)
    if "read_amax" in names:
        out["read_amax"] = Baseline(lambda: torch.amax(logits, dim=-1), nbytes + n_rows * logits.element_size(), None)
    if "read_triton" in names and importlib.util.find_spec("triton") is not None and logits.stride(-1) == 1 \
            and (device == "cuda" or triton_interpreted()):
        from rankops.bench.read_triton import triton_row_max

        def check_row_max():
            if not torch.equal(triton_row_max(logits), logits.amax(dim=-1).float()):
                raise CheckError("the Triton row-max baseline disagrees with torch.amax")
        out["read_triton"] = Baseline(lambda: triton_row_max(logits), nbytes + 4 * n_rows, check_row_max)
    if "read_sum" in names:
        out["read_sum"] = Baseline(lambda: logits.sum(), nbytes, None)
    if "copy" in names:
        scratch = torch.empty_like(logits)
        out["copy"] = Baseline(lambda: scratch.copy_(logits), 2 * nbytes, None)
    small_enough = logits.numel() <= REFERENCE_MAX_ELEMENTS
    if "torch" in names and small_enough:
        out["torch"] = Baseline(lambda: rankops.token_stats(logits, targets, backend="torch"),
                                nbytes + ROW_BYTES["token_stats"] * n_rows, None)
    if "torch_compiled" in names and small_enough:
        compiled_ref = compile_(reference.token_stats)
        out["torch_compiled"] = Baseline(lambda: compiled_ref(logits, targets, -100, n_cols),
                                         nbytes + ROW_BYTES["token_stats"] * n_rows, None)

    def loss_check(name, fn):
        def check_loss():
            got = float(fn())
            # The loss of low-precision logits is returned in their dtype: bf16 keeps ~3 digits.
            if not abs(got - want_loss) <= 1e-2 * abs(want_loss):
                raise CheckError(f"baseline {name}: loss {got}, the mean -logp of float64 truth is {want_loss}")
        return check_loss
    if "ce_compiled" in names:
        compiled_ce = compile_(cross_entropy_loss)
        fn = lambda: compiled_ce(logits, targets)
        out["ce_compiled"] = Baseline(fn, nbytes + ROW_BYTES["loss"] * n_rows, loss_check("ce_compiled", fn))
    liger = liger_loss() if "liger" in names and (device == "cuda" or triton_interpreted()) else None
    if liger is not None:
        liger_logits = logits.clone()  # Liger's forward can write its gradient into its input
        fn = lambda: liger(liger_logits, targets)
        out["liger"] = Baseline(fn, nbytes + ROW_BYTES["loss"] * n_rows, loss_check("liger", fn))
    if "serving_rank" in names:
        compiled_serving = compile_(serving_rank)

        def check_serving():
            tail = slice(max(0, n_rows - 256), n_rows)
            got = compiled_serving(logits, targets)[tail].to(ref.rank.device)
            want = TokenStats(ref.rank[tail], ref.ties[tail], ref.logp[tail]).rank_as("vllm")
            # fp32 logprobs keep the order of the logits, but can merge close neighbours (a few
            # percent of the rows at V = 262144 in fp32): never below, rarely above.
            if bool((got < want).any()) or (got != want).float().mean().item() > 0.25:
                raise CheckError("the serving-engine rank baseline is not rank + ties + 1 on the last rows")
        out["serving_rank"] = Baseline(lambda: compiled_serving(logits, targets),
                                       nbytes + ROW_BYTES["token_stats"] * n_rows, check_serving)
    return out


# ---------------------------------------------------------------------------------------------
# The environment, one case, the table


def environment(device: str) -> dict:
    """What a row needs to be compared with another: date, versions, processor, GPU and driver."""
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "rankops": rankops.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if _ext.has_cpu_kernel():
        env["cpu_isa"] = _ext.cpu_isa()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
        env["triton"] = _version("triton")
    return env


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_case(opts: BenchOptions, env: dict, flush, dtype_name: str, n_rows: int, n_vocab: int,
             progress=None) -> list:
    """Checks, then times one case; returns its rows (dicts, bench/results/*.jsonl's format).
    progress(text) is told what was checked before the timing starts."""
    device = opts.device
    logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], device)
    nbytes = logits.numel() * logits.element_size()
    ref = reference_stats(logits, targets)
    kernels = [b for b in opts.backends if b != "torch"]  # torch is the reference itself
    worst = {}
    for backend in kernels:  # checked as users call it, and as it is timed
        worst[backend] = max(
            check_token_stats(backend, rankops.token_stats(logits, targets, backend=backend), ref, n_vocab),
            check_token_stats(f"{backend} (sync-free)",
                              rankops.token_stats(logits, targets, backend=backend, **SYNC_FREE), ref, n_vocab))
        if opts.accumulate:
            check_accumulate(backend, logits, targets, ref)
    base = baselines(device, opts.baselines, logits, targets, n_vocab, opts.compile_backend, ref)
    for b in base.values():
        if b.check is not None:
            b.check()
    if progress is not None:
        checked = ", ".join(f"{b} (logp error {worst[b]:.2f} of the bound)" for b in kernels) or "no kernel"
        progress(f"checked {checked}: ranks and ties exact; baselines {', '.join(base) or 'none'} ok; ")
    del ref
    fns = {name: b.fn for name, b in base.items()}
    moved = {name: b.bytes_moved for name, b in base.items()}
    for backend in kernels:
        fns[backend] = (lambda b: lambda: rankops.token_stats(logits, targets, backend=b, **SYNC_FREE))(backend)
        moved[backend] = nbytes + ROW_BYTES["token_stats"] * n_rows
        if opts.accumulate:
            acc = rankops.RankAccumulator(n_vocab, device=device)
            fns[f"acc_{backend}"] = (lambda b, a: lambda: a.update(logits, targets, backend=b, **SYNC_FREE))(backend, acc)
            moved[f"acc_{backend}"] = nbytes + ROW_BYTES["accumulate"] * n_rows
    repeat = opts.repeat or default_repeat(device, nbytes)
    ms = time_interleaved(fns, repeat, device, flush)
    gbps = {name: moved[name] / 1e6 / ms[name] for name in fns}
    read = [n for n in ("read_amax", "read_triton", "read_sum") if n in ms]
    read_name = max(read, key=lambda n: gbps[n]) if read else None
    read_gbps = gbps[read_name] if read_name else None
    copy_gbps = gbps.get("copy")
    rows = []
    for name in fns:
        role = "rankops" if name in kernels or name.startswith("acc_") else "baseline"
        rows.append(dict(
            env, op="token_stats", backend=name, role=role, device=device, dtype=dtype_name,
            N=n_rows, V=n_vocab, ms=round(ms[name], 4), bytes=moved[name], gbps=round(gbps[name], 2),
            read_baseline=read_name, baseline_gbps=_round(read_gbps, 2),
            bw_frac=_round(gbps[name] / read_gbps if read_gbps else None, 3),
            copy_gbps=_round(copy_gbps, 2),
            speedup_vs_torch=_ratio(ms, "torch", name),
            speedup_vs_compiled=_ratio(ms, "torch_compiled", name),
            speedup_vs_ce_compiled=_ratio(ms, "ce_compiled", name),
            speedup_vs_liger=_ratio(ms, "liger", name),
            speedup_vs_serving_rank=_ratio(ms, "serving_rank", name),
            acc_over_token_stats=(round(ms[name] / ms[name[4:]], 3) if name.startswith("acc_") else None),
            peak_extra_mb=_round(peak_extra_mb(fns[name], device), 3),
            checked="full", repeat=repeat,
            timing="cuda events, L2 flushed, median" if device == "cuda" else "perf_counter, median",
            sync_free=role == "rankops"))
    return rows


def default_repeat(device: str, nbytes: int, cpu_repeat: int = 5) -> int:
    return cpu_repeat if device == "cpu" else (120 if nbytes < 256 * 2**20 else 30)


TABLE_COLUMNS = (  # (header, row field, format); a column with no value in any row is left out
    ("candidate", "backend", "{}"), ("dtype", "dtype", "{}"), ("N", "N", "{}"), ("V", "V", "{}"),
    ("ms", "ms", "{:.3f}"), ("GB/s", "gbps", "{:.1f}"), ("of read", "bw_frac", "{:.2f}"),
    ("of copy", "copy_frac", "{:.2f}"),
    ("x torch", "speedup_vs_torch", "{:g}"), ("x torch.compile", "speedup_vs_compiled", "{:g}"),
    ("x compiled CE", "speedup_vs_ce_compiled", "{:g}"), ("x Liger", "speedup_vs_liger", "{:g}"),
    ("x serving rank", "speedup_vs_serving_rank", "{:g}"), ("acc / token_stats", "acc_over_token_stats", "{:g}"),
    ("extra MB", "peak_extra_mb", "{:g}"),
)


def format_table(rows: list) -> str:
    """A markdown table of the rows: one line per candidate and case."""
    rows = [dict(r, copy_frac=(r["gbps"] / r["copy_gbps"] if r.get("copy_gbps") else None)) for r in rows]
    columns = [c for c in TABLE_COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = ["-" if r.get(field) is None else fmt.format(r[field]) for _, field, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(opts: BenchOptions, out=None) -> list:
    """Every case of opts: a progress line per case, the table at the end, rows appended to
    opts.json_path case by case (a long run keeps what it measured). Raises CheckError."""
    out = out or (lambda text="", end="\n": print(text, end=end, flush=True))
    env = environment(opts.device)
    flush = l2_flush(opts.device)
    out("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    out(f"# backends {', '.join(opts.backends)}; rankops timed sync-free; "
        + ("CUDA events, L2 flushed before each call, median" if opts.device == "cuda"
           else "monotonic clock, median"))
    cases = [(d, n, v) for d in opts.dtypes for n, v in opts.shapes]
    rows = []
    for i, (dtype_name, n_rows, n_vocab) in enumerate(cases, 1):
        t0 = time.perf_counter()
        out(f"[{i}/{len(cases)}] {dtype_name} {n_rows}x{n_vocab}: ", end="")
        torch._dynamo.reset()  # static shapes per case, and no recompile limit across cases
        case_rows = run_case(opts, env, flush, dtype_name, n_rows, n_vocab, progress=lambda t: out(t, end=""))
        mine = [r for r in case_rows if r["role"] == "rankops" and not r["backend"].startswith("acc_")]
        summary = "; ".join(f"{r['backend']} {r['ms']:.3f} ms" + (f", {r['bw_frac']:.2f} of read" if r["bw_frac"] else "")
                            + (f", {r['speedup_vs_torch']:g}x torch" if r["speedup_vs_torch"] else "") for r in mine)
        out(f"timed, {time.perf_counter() - t0:.1f} s in all" + (f": {summary}" if summary else ""))
        rows += case_rows
        if opts.json_path:
            with open(opts.json_path, "a") as f:
                for row in case_rows:
                    f.write(json.dumps(row) + "\n")
    out()
    out(format_table(rows))
    return rows


# ---------------------------------------------------------------------------------------------
# The command line, shared by `rankops bench` and bench/bench_token_stats.py


def parse_shape(text: str):
    try:
        n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxV, e.g. 2048x50304; got {text!r}")
    if n < 1 or v < 2:
        raise argparse.ArgumentTypeError(f"a shape needs N >= 1 and V >= 2; got {text!r}")
    return n, v


def add_arguments(p: argparse.ArgumentParser, profile: str) -> None:
    prof = PROFILES[profile]
    shapes_cpu = " ".join(f"{n}x{v}" for v in prof.cpu_v for n in prof.cpu_n)
    shapes_cuda = " ".join(f"{n}x{v}" for n, v in prof.cuda_shapes)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda where there is a GPU, else cpu")
    p.add_argument("--backends", nargs="+", default=None,
                   help="rankops backends to check and time (default: every available one on the device, "
                        "but not torch, the reference, nor triton on a CPU, where it runs only under "
                        "TRITON_INTERPRET=1, slowly); naming torch times the reference")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="NxV",
                   help=f"the cases (default on a CPU: {shapes_cpu}; on a GPU: {shapes_cuda})")
    p.add_argument("--n", nargs="+", type=int, default=None, help="rows (tokens), with every --v")
    p.add_argument("--v", nargs="+", type=int, default=None, help="vocabulary sizes, with every --n")
    p.add_argument("--baselines", nargs="+", default=None, choices=BASELINES + ("all",), metavar="NAME",
                   help=f"{', '.join(BASELINES)} or all (default on a CPU: "
                        f"{' '.join(DEFAULT_BASELINES['cpu'])}; on a GPU: all)")
    p.add_argument("--no-accumulate", action="store_true", help="do not check or time RankAccumulator.update")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for the compiled baselines (eager: a quick dry run)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed rounds (default {prof.cpu_repeat} on a CPU; 30 on a GPU, 120 for cases under 256 MB)")
    p.add_argument("--json", metavar="PATH", help="append the rows as JSON lines to PATH (bench/results' format)")


def options_from_args(args, profile: str) -> BenchOptions:
    """BenchOptions from parsed arguments; ValueError naming the argument where they cannot run here."""
    prof = PROFILES[profile]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: there is no CUDA device here")
    if args.shapes:
        shapes = list(args.shapes)
    elif device == "cuda" and not (args.n or args.v):
        shapes = list(prof.cuda_shapes)
    else:
        shapes = [(n, v) for v in (args.v or prof.cpu_v) for n in (args.n or prof.cpu_n)]
    for n, v in shapes:
        if n < 1 or v < 2:
            raise ValueError(f"--shapes/--n/--v: a case needs N >= 1 rows and V >= 2 columns, got {n}x{v}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: the folder of {args.json} does not exist")
    available = rankops.available_backends()
    if args.backends is None:
        backends = [b for b in available if b in ON_DEVICE[device] and not (device == "cpu" and b == "triton")]
    else:
        backends = list(dict.fromkeys(args.backends))
        for b in backends:
            if b not in available:
                hint = " (on a CPU it runs under TRITON_INTERPRET=1)" if b == "triton" else ""
                raise ValueError(f"--backends: {b!r} is not available here{hint}; available: {', '.join(available)}")
            if b != "torch" and b not in ON_DEVICE[device]:
                raise ValueError(f"--backends: {b!r} does not run on --device {device}")
            if b == "triton" and device == "cpu" and not triton_interpreted():
                raise ValueError("--backends: 'triton' runs on --device cpu only under TRITON_INTERPRET=1; "
                                 "use --device cuda")
    names = DEFAULT_BASELINES[device] if args.baselines is None else \
        (BASELINES if "all" in args.baselines else tuple(args.baselines))
    if "torch" in backends and "torch" not in names:
        names = tuple(names) + ("torch",)  # naming the reference times it, as the torch baseline
    if args.repeat is not None and args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    repeat = args.repeat or (prof.cpu_repeat if device == "cpu" else None)
    return BenchOptions(device=device, backends=tuple(backends), dtypes=tuple(args.dtypes), shapes=tuple(shapes),
                        baselines=tuple(names), accumulate=not args.no_accumulate,
                        compile_backend=args.compile_backend, repeat=repeat, json_path=args.json)


def run_from_args(args, profile: str) -> int:
    """Exit status: 0, 1 when a check fails (FAIL: on stderr, nothing of that case timed), 2 for
    arguments that cannot run here."""
    try:
        opts = options_from_args(args, profile)
    except ValueError as exc:
        print(f"rankops bench: {exc}", file=sys.stderr)
        return 2
    try:
        run(opts)
    except CheckError as exc:
        print(f"\nFAIL: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _round(x, digits):
    return None if x is None else round(x, digits)


def _ratio(ms, baseline, name):
    return round(ms[baseline] / ms[name], 2) if baseline in ms else None


def fmt(x):
    return "-" if x is None else f"{x:g}"
