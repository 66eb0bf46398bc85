"""Benchmark of rankops.token_stats: check first, then time, against baselines of the same run.

For every case (backend, dtype, N, V) it prints ms, GB/s of logits read, the fraction of a
one-pass read of the same tensor (the faster of torch.amax and torch.sum over it) and the
speedup over the torch reference backend. All of a case's timings are interleaved round by
round, so the ratios compare like with like on a shared, noisy machine. Results are checked against the
reference before anything is timed: ranks and ties exactly, logp to 1e-4.

    python bench/bench_token_stats.py                      # the CPU cases of the core issue
    python bench/bench_token_stats.py --json rows.jsonl    # also write rows as JSON lines
"""
import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

import rankops
from rankops import _ext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """Median ms of each fn, after one warm-up call each. The fns take turns within every
    round, so a change in machine load affects all of them alike and their ratios hold."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_elapsed_ms(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


def make_case(n_rows: int, n_vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, n_vocab, generator=g) * 3.0).to(dtype).to(device)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g).to(device)
    targets[::17] = -100  # a few ignored tokens, as padding produces
    return logits, targets


def check(backend: str, logits, targets, ref) -> None:
    got = rankops.token_stats(logits, targets, backend=backend)
    if not (torch.equal(got.rank, ref.rank) and torch.equal(got.ties, ref.ties)):
        sys.exit(f"FAIL: backend {backend} disagrees with the torch reference on ranks or ties")
    err = (got.logp.double() - ref.logp.double()).abs().max().item()
    if err > 1e-4:
        sys.exit(f"FAIL: backend {backend} logp differs from the reference by {err:.3g}")


def environment(device: str) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "rankops": rankops.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
    }
    if _ext.has_cpu_kernel():
        env["cpu_isa"] = _ext._C.cpu_isa()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=None, help="default: every available one but torch")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--n", nargs="+", type=int, default=[2048], help="rows (tokens)")
    p.add_argument("--v", nargs="+", type=int, default=[50304, 128256], help="vocabulary sizes")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="append the rows as JSON lines to PATH")
    args = p.parse_args()

    backends = args.backends or [b for b in rankops.available_backends() if b != "torch"]
    env = environment(args.device)
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    header = (f"{'backend':<10} {'device':<6} {'dtype':<5} {'N':>6} {'V':>7} {'ms':>9} {'GB/s':>7} "
              f"{'read_frac':>9} {'vs_torch':>8}")
    print(header)
    rows = []
    for dtype_name in args.dtypes:
        for n_vocab in args.v:
            for n_rows in args.n:
                logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], args.device)
                gbytes = logits.numel() * logits.element_size() / 1e9
                ref = rankops.token_stats(logits, targets, backend="torch")
                for backend in backends:
                    check(backend, logits, targets, ref)
                fns = {
                    "read_amax": lambda: logits.amax(),
                    "read_sum": lambda: logits.sum(),
                    "torch": lambda: rankops.token_stats(logits, targets, backend="torch"),
                }
                for backend in backends:
                    fns[backend] = (lambda b: lambda: rankops.token_stats(logits, targets, backend=b))(backend)
                ms_by_name = time_interleaved(fns, args.repeat, args.device)
                read_ms = min(ms_by_name["read_amax"], ms_by_name["read_sum"])
                torch_ms = ms_by_name["torch"]
                cases = [("torch", torch_ms)] + [(b, ms_by_name[b]) for b in backends]
                for backend, ms in cases:
                    row = dict(env, op="token_stats", backend=backend, device=args.device,
                               dtype=dtype_name, N=n_rows, V=n_vocab, ms=round(ms, 3),
                               gbps=round(gbytes / (ms / 1e3), 2), read_ms=round(read_ms, 3),
                               read_frac=round(read_ms / ms, 3),
                               speedup_vs_torch=round(torch_ms / ms, 2))
                    rows.append(row)
                    print(f"{backend:<10} {args.device:<6} {dtype_name:<5} {n_rows:>6} {n_vocab:>7} "
                          f"{ms:>9.2f} {row['gbps']:>7.2f} {row['read_frac']:>9.2f} "
                          f"{row['speedup_vs_torch']:>8.1f}")
                del logits, targets, ref
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
