"""Benchmark of rankops.token_stats: check first, then time, against baselines of the same run.

Every case (dtype, N, V) is checked before anything is timed: each rankops backend against the
torch reference (ranks and ties exactly, logp to 1e-4), the accumulator's counts against the
reference ranks, and each baseline against what it should compute. Then all of the case's
timings are interleaved round by round, so the ratios compare like with like on a shared, noisy
machine. On a GPU every call is timed alone with CUDA events after the L2 cache is flushed
(the few-row cases fit in L2), and the median of many calls is kept.

Bytes counted per call: N*V*dtype_size for the logits, plus the per-row inputs and outputs
(targets 8 B; rank, ties 8 B each and logp 4 B for token_stats). Printed and recorded per
candidate: ms, GB/s, the fraction of the pure-read bandwidth of the same run, speedups over the
baselines, peak extra device memory (allocator bytes beyond the inputs), and for acc_<backend>
(RankAccumulator.update) its time over token_stats alone. The rankops calls are timed
sync-free (check_finite=False, validate=False), as a training or evaluation loop would run them.

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
                 entries >= the target's (1-based), under torch.compile
"read" in the ratios is the faster of read_amax and read_triton (on the CPU: of amax and sum).

    python bench/bench_token_stats.py                       # the CPU cases of the core issue
    python bench/bench_token_stats.py --device cuda --json bench/results/token_stats_cuda.jsonl
    TRITON_INTERPRET=1 python bench/bench_token_stats.py --shapes 4x1000 --backends cpu triton \
        --baselines all --compile-backend eager              # every code path, tiny, on a CPU
"""
import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import rankops
from rankops import _ext
from rankops.ops import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the read_triton baseline is left out
    triton = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {  # (N values, V values) per device, as the issues ask
    "cpu": ([2048], [50304, 128256]),
}
# The GPU cases of the performance issue: three shapes of 2^31 logits (the target is stated at
# 16384 x 131072), Llama 3's vocabulary, and few rows with a huge vocabulary (decoding, where the
# work must be split across the vocabulary to fill the GPU).
CUDA_SHAPES = [(16384, 131072), (32768, 65536), (8192, 262144), (8192, 128256), (1, 262144), (64, 262144)]
REFERENCE_MAX_ELEMENTS = 2 ** 31  # the reference materialises several [N, V] temporaries
ROW_BYTES = {"token_stats": 8 + 8 + 8 + 4, "accumulate": 8, "read": 0, "loss": 8}  # per row, beyond the logits
BASELINES = ("read_amax", "read_triton", "read_sum", "copy", "torch", "torch_compiled", "ce_compiled",
             "liger", "serving_rank")
DEFAULT_BASELINES = {"cpu": ("read_amax", "read_sum", "torch"), "cuda": BASELINES}
SYNC_FREE = dict(check_finite=False, validate=False)


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


def peak_extra_mb(fn, device: str):
    """Peak memory allocated by fn beyond what was allocated before it, in MB (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 1e6, 3)


def make_case(n_rows: int, n_vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n_rows, n_vocab, dtype=dtype, device=device)
    for start in range(0, n_rows, 1024):  # block by block: no fp32 temporary of the whole case
        block = logits[start:start + 1024]
        block.copy_(torch.randn(block.shape, generator=g, device=device) * 3.0)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g, device=device)
    targets[::17] = -100  # a few ignored tokens, as padding produces
    return logits, targets


def fail(msg: str):
    sys.exit(f"FAIL: {msg}")


def check(backend: str, logits, targets, ref) -> None:
    got = rankops.token_stats(logits, targets, backend=backend)
    if not (torch.equal(got.rank, ref.rank) and torch.equal(got.ties, ref.ties)):
        fail(f"backend {backend} disagrees with the torch reference on ranks or ties")
    err = (got.logp.double() - ref.logp.double()).abs().max().item()
    if err > 1e-4:
        fail(f"backend {backend} logp differs from the reference by {err:.3g}")


def check_accumulate(backend: str, logits, targets, ref) -> None:
    acc = rankops.RankAccumulator(logits.shape[-1], device=logits.device)
    acc.update(logits, targets, backend=backend)
    kept = ref.rank[ref.rank >= 0]
    want = torch.bincount(kept, minlength=logits.shape[-1])
    if not torch.equal(acc.count.to(want.device, torch.int64), want):
        fail(f"RankAccumulator.update(backend={backend!r}) counts differ from the reference ranks")


if triton is not None:
    @triton.jit
    def _row_max_kernel(x_ptr, out_ptr, stride_row, n_cols, chunk, n_chunks, BLOCK: tl.constexpr):
        # One program reads one chunk of one row: the pure-read baseline has the same freedom
        # to spread few rows over the GPU as the kernels it is compared with.
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        begin = c * chunk
        end = tl.minimum(begin + chunk, n_cols)
        acc = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(begin, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_row + cols, mask=cols < end, other=float("-inf"))
            acc = tl.maximum(acc, x.to(tl.float32))
        tl.store(out_ptr + row * n_chunks + c, tl.max(acc, axis=0))


def triton_row_max(logits):
    """Row maxima [N] fp32 of contiguous-row logits [N, V]: one read, split into >= 1024 programs
    where the rows allow (chunks of 16384 columns, halved down to one block)."""
    n_rows, n_cols = logits.shape
    block = min(4096, triton.next_power_of_2(n_cols))
    chunk = max(16384, block)
    while chunk > block and n_rows * triton.cdiv(n_cols, chunk) < 1024:
        chunk //= 2
    n_chunks = triton.cdiv(n_cols, chunk)
    part = torch.empty(n_rows, n_chunks, dtype=torch.float32, device=logits.device)
    _row_max_kernel[(n_rows, n_chunks)](logits, part, logits.stride(0), n_cols, chunk, n_chunks,
                                        BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return part[:, 0] if n_chunks == 1 else part.amax(dim=1)


def serving_rank(logits, targets, ignore_index: int = -100):
    """The rank serving engines report: 1-based, greater-or-equal, on fp32 log-probabilities
    (docs/DESIGN.md: rank + ties + 1 on the logits, except where two logits round to one logprob)."""
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


def environment(device: str) -> dict:
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
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


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


def baselines(device, names, logits, targets, n_cols, compile_backend, want_loss):
    """name -> (fn, bytes it moves, check): check() exits with FAIL if fn's result is wrong
    (want_loss: the mean -logp of the kept tokens, from the reference). Baselines that cannot
    run here are left out."""
    n_rows = logits.shape[0]
    nbytes = logits.numel() * logits.element_size()
    out = {}
    compile_ = lambda fn: torch.compile(fn, backend=compile_backend, dynamic=False)
    row_max = None
    if "read_amax" in names:
        out["read_amax"] = (lambda: torch.amax(logits, dim=-1), nbytes + n_rows * logits.element_size(), None)
    if "read_triton" in names and triton is not None and logits.stride(-1) == 1 \
            and (device == "cuda" or _triton_interpreted()):
        row_max = logits.amax(dim=-1).float()
        def check_row_max():
            if not torch.equal(triton_row_max(logits), row_max):
                fail("the Triton row-max baseline disagrees with torch.amax")
        out["read_triton"] = (lambda: triton_row_max(logits), nbytes + 4 * n_rows, check_row_max)
    if "read_sum" in names:
        out["read_sum"] = (lambda: logits.sum(), nbytes, None)
    if "copy" in names:
        scratch = torch.empty_like(logits)
        out["copy"] = (lambda: scratch.copy_(logits), 2 * nbytes, None)
    small_enough = logits.numel() <= REFERENCE_MAX_ELEMENTS
    if "torch" in names and small_enough:
        out["torch"] = (lambda: rankops.token_stats(logits, targets, backend="torch"),
                        nbytes + ROW_BYTES["token_stats"] * n_rows, None)
    if "torch_compiled" in names and small_enough:
        compiled_ref = compile_(reference.token_stats)
        out["torch_compiled"] = (lambda: compiled_ref(logits, targets, -100, n_cols),
                                 nbytes + ROW_BYTES["token_stats"] * n_rows, None)
    def loss_check(name, fn):
        def check_loss():
            got = float(fn())
            if not abs(got - want_loss) <= 1e-2 * abs(want_loss):
                fail(f"baseline {name}: loss {got}, the reference's mean -logp is {want_loss}")
        return check_loss
    if "ce_compiled" in names:
        compiled_ce = compile_(cross_entropy_loss)
        fn = lambda: compiled_ce(logits, targets)
        out["ce_compiled"] = (fn, nbytes + ROW_BYTES["loss"] * n_rows, loss_check("ce_compiled", fn))
    liger = liger_loss() if "liger" in names and (device == "cuda" or _triton_interpreted()) else None
    if liger is not None:
        liger_logits = logits.clone()  # Liger's forward can write its gradient into its input
        fn = lambda: liger(liger_logits, targets)
        out["liger"] = (fn, nbytes + ROW_BYTES["loss"] * n_rows, loss_check("liger", fn))
    if "serving_rank" in names:
        compiled_serving = compile_(serving_rank)
        def check_serving():
            ref = rankops.token_stats(logits[-256:], targets[-256:], backend="torch")
            got = compiled_serving(logits, targets)[-256:]
            want = torch.where(ref.rank >= 0, ref.rank + ref.ties + 1, -1)
            # fp32 logprobs keep the order of the logits, but can merge close neighbours (a few
            # percent of the rows at V = 262144 in fp32): never below, rarely above.
            if bool((got < want).any()) or (got != want).float().mean().item() > 0.25:
                fail("the serving-engine rank baseline is not rank + ties + 1 on the last rows")
        out["serving_rank"] = (lambda: compiled_serving(logits, targets),
                               nbytes + ROW_BYTES["token_stats"] * n_rows, check_serving)
    return out


def _triton_interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def parse_shape(text: str):
    try:
        n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxV, e.g. 16384x131072; got {text!r}")
    return n, v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available one on the device but torch")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--n", nargs="+", type=int, default=None, help="rows (tokens)")
    p.add_argument("--v", nargs="+", type=int, default=None, help="vocabulary sizes")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="NxV",
                   help="explicit cases instead of every --n with every --v (CUDA default: the issue's)")
    p.add_argument("--baselines", nargs="+", default=None, choices=BASELINES + ("all",),
                   help=f"default on the CPU: {' '.join(DEFAULT_BASELINES['cpu'])}; on a GPU: all")
    p.add_argument("--no-accumulate", action="store_true", help="do not time RankAccumulator.update")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for the compiled baselines (eager: a quick dry run)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed rounds (default 9 CPU; 30 CUDA, 4x that for cases under 256 MB)")
    p.add_argument("--json", metavar="PATH", help="append the rows as JSON lines to PATH")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.shapes:
        shapes = args.shapes
    elif args.device == "cuda" and not (args.n or args.v):
        shapes = CUDA_SHAPES
    else:
        n_values = args.n or DEFAULTS["cpu"][0]
        v_values = args.v or DEFAULTS["cpu"][1]
        shapes = [(n, v) for v in v_values for n in n_values]
    baseline_names = DEFAULT_BASELINES[args.device] if args.baselines is None else \
        (BASELINES if "all" in args.baselines else tuple(args.baselines))
    on_device = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}[args.device]
    backends = args.backends or [b for b in rankops.available_backends() if b in on_device]
    flush = l2_flush(args.device)

    env = environment(args.device)
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print("# rankops timed sync-free; " + ("CUDA events, L2 flushed before each call, median"
                                          if args.device == "cuda" else "monotonic clock, median"))
    print(f"{'candidate':<15} {'dtype':<5} {'N':>6} {'V':>7} {'ms':>9} {'GB/s':>8} {'read_frac':>9} "
          f"{'vs_ce_comp':>10} {'vs_serving':>10} {'vs_liger':>8} {'vs_torch':>8} {'acc/ts':>6} {'extra_MB':>9}")
    for dtype_name in args.dtypes:
        for n_rows, n_vocab in shapes:
            torch._dynamo.reset()  # static shapes per case, and no recompile limit across cases
            rows = run_case(args, env, backends, baseline_names, flush, dtype_name, n_rows, n_vocab)
            if args.json:  # written case by case, so a long run keeps what it measured
                with open(args.json, "a") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")


def run_case(args, env, backends, baseline_names, flush, dtype_name, n_rows, n_vocab):
    device = args.device
    logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], device)
    nbytes = logits.numel() * logits.element_size()
    can_check = logits.numel() <= REFERENCE_MAX_ELEMENTS
    if can_check:
        ref = rankops.token_stats(logits, targets, backend="torch")
        want_loss = -ref.logp[ref.rank >= 0].double().mean().item()
        for backend in backends:
            check(backend, logits, targets, ref)
            if not args.no_accumulate:
                check_accumulate(backend, logits, targets, ref)
        del ref
    else:  # the reference would not fit: check the last rows only
        tail = slice(max(0, n_rows - 16), n_rows)
        ref = rankops.token_stats(logits[tail], targets[tail], backend="torch")
        want_loss = -rankops.token_stats(logits, targets, backend=backends[0]).logp[targets != -100].double().mean().item()
        for backend in backends:
            got = rankops.token_stats(logits, targets, backend=backend)
            if not torch.equal(got.rank[tail], ref.rank):
                fail(f"backend {backend} ranks differ on the last rows")
    base = baselines(device, baseline_names, logits, targets, n_vocab, args.compile_backend, want_loss)
    for name, (_, _, check_fn) in base.items():
        if check_fn is not None:
            check_fn()
    fns = {name: fn for name, (fn, _, _) in base.items()}
    moved = {name: b for name, (_, b, _) in base.items()}
    for backend in backends:
        fns[backend] = (lambda b: lambda: rankops.token_stats(logits, targets, backend=b, **SYNC_FREE))(backend)
        moved[backend] = nbytes + ROW_BYTES["token_stats"] * n_rows
        if not args.no_accumulate:
            acc = rankops.RankAccumulator(n_vocab, device=device)
            fns[f"acc_{backend}"] = (lambda b, a: lambda: a.update(logits, targets, backend=b, **SYNC_FREE))(backend, acc)
            moved[f"acc_{backend}"] = nbytes + ROW_BYTES["accumulate"] * n_rows
    repeat = args.repeat or (9 if device == "cpu" else (120 if nbytes < 256 * 2**20 else 30))
    ms = time_interleaved(fns, repeat, device, flush)
    gbps = {name: moved[name] / 1e6 / ms[name] for name in fns}
    read = [n for n in ("read_amax", "read_triton", "read_sum") if n in ms]
    read_name = max(read, key=lambda n: gbps[n]) if read else None
    read_gbps = gbps[read_name] if read_name else None
    copy_gbps = gbps.get("copy")
    rows = []
    for name in fns:
        role = "rankops" if name in backends or name.startswith("acc_") else "baseline"
        row = dict(env, op="token_stats", backend=name, role=role, device=device, dtype=dtype_name,
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
                   peak_extra_mb=peak_extra_mb(fns[name], device),
                   checked="full" if can_check else "last rows", repeat=repeat,
                   timing="cuda events, L2 flushed, median" if device == "cuda" else "perf_counter, median",
                   sync_free=role == "rankops")
        rows.append(row)
        print(f"{name:<15} {dtype_name:<5} {n_rows:>6} {n_vocab:>7} {ms[name]:>9.3f} {gbps[name]:>8.1f} "
              f"{_fmt(row['bw_frac']):>9} {_fmt(row['speedup_vs_ce_compiled']):>10} "
              f"{_fmt(row['speedup_vs_serving_rank']):>10} {_fmt(row['speedup_vs_liger']):>8} "
              f"{_fmt(row['speedup_vs_torch']):>8} {_fmt(row['acc_over_token_stats']):>6} "
              f"{_fmt(row['peak_extra_mb']):>9}", flush=True)
    return rows


def _round(x, digits):
    return None if x is None else round(x, digits)


def _ratio(ms, baseline, name):
    return round(ms[baseline] / ms[name], 2) if baseline in ms else None


def _fmt(x):
    return "-" if x is None else f"{x:g}"


if __name__ == "__main__":
    main()
