"""Benchmark of rankops.token_stats: check first, then time, against baselines of the same run.

Every case (dtype, N, V) is checked against the torch reference before anything is timed
(ranks and ties exactly, logp to 1e-4), then all of its timings are interleaved round by round,
so the ratios compare like with like on a shared, noisy machine. Printed per backend: ms, GB/s
of logits read, the fraction of a same-run bandwidth baseline, speedups over the baselines, and
(on a GPU) peak extra memory.

Baselines:
  CPU:  read         the faster of torch.amax and torch.sum over the logits (one read)
        torch        rankops' pure-torch reference backend
  CUDA: copy         a device-to-device copy of the logits; its bandwidth counts read + write
        torch        the reference backend, eager
        torch_compiled  the reference backend under torch.compile
        liger        Liger-Kernel's cross-entropy forward (loss only, no rank), if installed

    python bench/bench_token_stats.py                       # the CPU cases of the core issue
    python bench/bench_token_stats.py --device cuda --json bench/results/token_stats_cuda.jsonl
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

import rankops
from rankops import _ext
from rankops.ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {  # (N values, V values) per device, as the issues ask
    "cpu": ([2048], [50304, 128256]),
    "cuda": ([1, 64, 1024, 8192, 32768], [50304, 128256, 151936, 262144]),
}
REFERENCE_MAX_ELEMENTS = 2 ** 31  # the reference materialises several [N, V] temporaries


def _elapsed_ms(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict, repeat: int, device: str) -> dict:
    """Median ms of each fn after one warm-up call each, the fns taking turns every round."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_elapsed_ms(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


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
    logits = (torch.randn(n_rows, n_vocab, generator=g, device=device) * 3.0).to(dtype)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g, device=device)
    targets[::17] = -100  # a few ignored tokens, as padding produces
    return logits, targets


def check(backend: str, logits, targets, ref) -> None:
    got = rankops.token_stats(logits, targets, backend=backend)
    if not (torch.equal(got.rank, ref.rank) and torch.equal(got.ties, ref.ties)):
        sys.exit(f"FAIL: backend {backend} disagrees with the torch reference on ranks or ties")
    err = (got.logp.double() - ref.logp.double()).abs().max().item()
    if err > 1e-4:
        sys.exit(f"FAIL: backend {backend} logp differs from the reference by {err:.3g}")


def liger_forward():
    """Liger-Kernel's fused cross-entropy forward, or None where it is not installed."""
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except ImportError:
        return None
    return lambda logits, targets: LigerCrossEntropyFunction.apply(logits, targets)


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
        env["cpu_isa"] = _ext._C.cpu_isa()
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


def baselines(device, logits, targets, n_cols):
    """name -> (fn, bytes it moves): the bandwidth baseline first, then the speed baselines."""
    nbytes = logits.numel() * logits.element_size()
    fns = {}
    if device == "cuda":
        scratch = torch.empty_like(logits)
        fns["copy"] = (lambda: scratch.copy_(logits), 2 * nbytes)
    else:
        fns["read_amax"] = (lambda: logits.amax(), nbytes)
        fns["read_sum"] = (lambda: logits.sum(), nbytes)
    if logits.numel() <= REFERENCE_MAX_ELEMENTS:
        fns["torch"] = (lambda: rankops.token_stats(logits, targets, backend="torch"), nbytes)
        if device == "cuda":
            compiled = torch.compile(reference.token_stats)
            fns["torch_compiled"] = (lambda: compiled(logits, targets, -100, n_cols), nbytes)
    liger = liger_forward() if device == "cuda" else None
    if liger is not None:
        liger_logits = logits.clone()  # Liger writes its gradient into its input
        fns["liger"] = (lambda: liger(liger_logits, targets), nbytes)
    return fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available one but torch")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--n", nargs="+", type=int, default=None, help="rows (tokens)")
    p.add_argument("--v", nargs="+", type=int, default=None, help="vocabulary sizes")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 9 CPU, 25 CUDA)")
    p.add_argument("--json", metavar="PATH", help="append the rows as JSON lines to PATH")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    n_values = args.n or DEFAULTS[args.device][0]
    v_values = args.v or DEFAULTS[args.device][1]
    repeat = args.repeat or (25 if args.device == "cuda" else 9)
    on_device = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}[args.device]
    backends = args.backends or [b for b in rankops.available_backends() if b in on_device]

    env = environment(args.device)
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'backend':<15} {'dtype':<5} {'N':>6} {'V':>7} {'ms':>9} {'GB/s':>8} {'bw_frac':>7} "
          f"{'vs_torch':>8} {'vs_compiled':>11} {'vs_liger':>8} {'extra_MB':>9}")
    rows = []
    for dtype_name in args.dtypes:
        for n_vocab in v_values:
            for n_rows in n_values:
                logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], args.device)
                nbytes = logits.numel() * logits.element_size()
                can_check = logits.numel() <= REFERENCE_MAX_ELEMENTS
                if can_check:
                    ref = rankops.token_stats(logits, targets, backend="torch")
                    for backend in backends:
                        check(backend, logits, targets, ref)
                    del ref
                else:  # the reference would not fit: check the last rows only
                    tail = slice(max(0, n_rows - 16), n_rows)
                    ref = rankops.token_stats(logits[tail], targets[tail], backend="torch")
                    for backend in backends:
                        got = rankops.token_stats(logits, targets, backend=backend)
                        if not torch.equal(got.rank[tail], ref.rank):
                            sys.exit(f"FAIL: backend {backend} ranks differ on the last rows")
                base = baselines(args.device, logits, targets, n_vocab)
                fns = {name: fn for name, (fn, _) in base.items()}
                for backend in backends:
                    fns[backend] = (lambda b: lambda: rankops.token_stats(logits, targets, backend=b))(backend)
                ms = time_interleaved(fns, repeat, args.device)
                if args.device == "cuda":
                    bw_gbps = base["copy"][1] / 1e6 / ms["copy"]
                else:
                    bw_gbps = nbytes / 1e6 / min(ms["read_amax"], ms["read_sum"])
                for name in [n for n in ("torch", "torch_compiled", "liger") if n in ms] + backends:
                    gbps = nbytes / 1e6 / ms[name]
                    row = dict(env, op="token_stats", backend=name, device=args.device,
                               dtype=dtype_name, N=n_rows, V=n_vocab, ms=round(ms[name], 4),
                               gbps=round(gbps, 2), baseline_gbps=round(bw_gbps, 2),
                               bw_frac=round(gbps / bw_gbps, 3),
                               speedup_vs_torch=_ratio(ms, "torch", name),
                               speedup_vs_compiled=_ratio(ms, "torch_compiled", name),
                               speedup_vs_liger=_ratio(ms, "liger", name),
                               peak_extra_mb=peak_extra_mb(fns[name], args.device),
                               checked="full" if can_check else "last rows")
                    rows.append(row)
                    print(f"{name:<15} {dtype_name:<5} {n_rows:>6} {n_vocab:>7} {ms[name]:>9.3f} "
                          f"{gbps:>8.1f} {row['bw_frac']:>7.2f} {_fmt(row['speedup_vs_torch']):>8} "
                          f"{_fmt(row['speedup_vs_compiled']):>11} {_fmt(row['speedup_vs_liger']):>8} "
                          f"{_fmt(row['peak_extra_mb']):>9}")
                del logits, targets, base, fns
                if args.json:  # written case by case, so a long run keeps what it measured
                    with open(args.json, "a") as f:
                        for row in rows:
                            f.write(json.dumps(row) + "\n")
                    rows = []


def _ratio(ms, baseline, name):
    return round(ms[baseline] / ms[name], 2) if baseline in ms else None


def _fmt(x):
    return "-" if x is None else f"{x:g}"


if __name__ == "__main__":
    main()
