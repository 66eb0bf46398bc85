"""Benchmark of rankops.linear_token_stats (the fused output layer) on the CPU.

Candidates, per case (dtype, N, D, V), each on the same inputs:
  matmul   F.linear(hidden, weight) alone: the work every candidate has to do
  baseline F.linear, then rankops.token_stats(backend="cpu") on the [N, V] logits
  linear   rankops.linear_token_stats(backend="cpu"): block by block, no [N, V] tensor
The first (untimed) call of each is the check: linear against baseline, ranks and ties equal
except where logits are within rounding (the mismatch rate is printed and must stay under 1%),
logp to 1e-3. Then the rounds are interleaved (matmul, baseline, linear, ...) so that the ratios
compare like with like on a shared machine; medians of the rounds are kept.

Peak extra memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one more call, over the resident set before it, inputs excluded. The issue's targets:
linear's peak extra memory <= 1/20 of the logits' size, its time within 10% of baseline's.

    python bench/bench_linear_token_stats.py --quick      # small shapes, seconds
    python bench/bench_linear_token_stats.py              # the issue's shapes (minutes, ~9 GB)
Rows are appended as JSONL to bench/results/linear_token_stats_cpu.jsonl.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import rankops
from rankops import _ext

SHAPES = [(8192, 640, 262144), (8192, 576, 49152)]  # (N, D, V): the two cases
QUICK_SHAPES = [(512, 64, 40000), (256, 96, 70000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = os.path.join(os.path.dirname(__file__), "results", "linear_token_stats_cpu.jsonl")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mb(fn) -> float:
    """Peak resident memory during fn() beyond what was resident before it, in MB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap memory would hide new allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def run_case(dtype_name, n, d, v, rounds):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    fns = {
        "matmul": lambda: F.linear(hidden, weight),
        "baseline": lambda: rankops.token_stats(F.linear(hidden, weight), targets, backend="cpu"),
        "linear": lambda: rankops.linear_token_stats(hidden, weight, targets, backend="cpu"),
    }
    want, got = fns["baseline"](), fns["linear"]()  # the check (and the warm-up)
    mismatch = float((got.rank != want.rank).float().mean())
    logp_err = float((got.logp - want.logp).abs().max())
    assert mismatch < 0.01 and float((got.ties != want.ties).float().mean()) < 0.01, mismatch
    assert logp_err < 1e-3, logp_err
    del want, got
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    peak = {name: peak_extra_mb(fns[name]) for name in ("baseline", "linear")}
    logits_mb = n * v * hidden.element_size() / 2 ** 20
    ms = {name: statistics.median(t) for name, t in times.items()}
    row = dict(
        date=datetime.date.today().isoformat(), device="cpu", processor=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), cpu_isa=_ext.cpu_isa(), torch=torch.__version__,
        rankops=rankops.__version__, python=platform.python_version(), op="linear_token_stats",
        dtype=dtype_name, N=n, D=d, V=v, rounds=rounds,
        ms_matmul=round(ms["matmul"], 2), ms_baseline=round(ms["baseline"], 2), ms_linear=round(ms["linear"], 2),
        time_ratio_vs_baseline=round(ms["linear"] / ms["baseline"], 3),
        time_ratio_vs_matmul=round(ms["linear"] / ms["matmul"], 3),
        logits_mb=round(logits_mb, 1), peak_extra_mb_baseline=round(peak["baseline"], 1),
        peak_extra_mb_linear=round(peak["linear"], 1),
        memory_frac_of_logits=round(peak["linear"] / logits_mb, 4),
        rank_mismatch_rate=mismatch, logp_max_abs_diff=logp_err)
    print(f"{dtype_name} N={n} D={d} V={v}: matmul {ms['matmul']:.0f} ms, matmul+token_stats "
          f"{ms['baseline']:.0f} ms, linear {ms['linear']:.0f} ms ({row['time_ratio_vs_baseline']:.2f}x); "
          f"peak extra {peak['baseline']:.0f} MB vs {peak['linear']:.0f} MB "
          f"({row['memory_frac_of_logits']:.3f} of the {logits_mb:.0f} MB logits); "
          f"rank mismatch {mismatch:.2e}, logp diff {logp_err:.1e}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 quick, 3 full)")
    p.add_argument("--json", default=RESULTS, help="JSONL file the rows are appended to ('' for none)")
    args = p.parse_args()
    rounds = args.rounds or (5 if args.quick else 3)
    for n, d, v in QUICK_SHAPES if args.quick else SHAPES:
        for dtype_name in args.dtypes:
            row = run_case(dtype_name, n, d, v, rounds)
            row["quick"] = args.quick
            if args.json:
                os.makedirs(os.path.dirname(args.json), exist_ok=True)
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            gc.collect()


if __name__ == "__main__":
    main()
