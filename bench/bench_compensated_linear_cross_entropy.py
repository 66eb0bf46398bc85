"""Benchmark of rankops.compensated_linear_cross_entropy (the compensated loss from hidden
states) on the CPU: forward + backward, time and peak memory.

Candidates, per case (dtype, N, D, V), each on the same inputs, each a forward and a backward
giving the gradients of hidden and weight:
  ce        F.linear, then F.cross_entropy: plain torch, the work every candidate has to do
  baseline  F.linear, then rankops.compensated_cross_entropy(backend="cpu") on the [N, V] logits
  linear    rankops.compensated_linear_cross_entropy(backend="cpu"): blocks, no [N, V] tensor
The first (untimed) call of each is the check: linear against baseline, the loss to 1e-4
relative and each gradient to 1e-3 of its largest element (fp32; 2e-2 for bf16). Then rounds
are interleaved (ce, baseline, linear, ...) so that the ratios compare like with like on a
shared machine; medians are kept.

Peak extra memory: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one more call, over the resident set before it (inputs excluded; the gradients of
hidden and weight, which every candidate returns, included).

    python bench/bench_compensated_linear_cross_entropy.py --quick   # small shapes, seconds
    python bench/bench_compensated_linear_cross_entropy.py           # N=4096, D=576, V=49152
Rows are appended as JSONL to bench/results/compensated_linear_cross_entropy_cpu.jsonl.
"""
import argparse
import gc
import json
import os

import torch
import torch.nn.functional as F

import rankops
from rankops.bench import environment, host_peak_extra_mb, time_interleaved

SHAPES = [(4096, 576, 49152)]  # (N, D, V): a SmolLM-135M-sized output layer, 4096 tokens
QUICK_SHAPES = [(512, 64, 20000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAM = 0.3
RESULTS = os.path.join(os.path.dirname(__file__), "results", "compensated_linear_cross_entropy_cpu.jsonl")


def run_case(dtype_name, n, d, v, rounds):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, d, generator=g) * 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    top = F.linear(hidden.detach(), weight.detach()).argmax(-1)
    targets = torch.where(torch.rand(n, generator=g) < 0.4, top, targets)  # rank 0 common
    del top

    def fwd_bwd(loss_fn):
        def fn():
            loss = loss_fn()
            gh, gw = torch.autograd.grad(loss, (hidden, weight))
            return loss.detach(), gh, gw
        return fn

    fns = {
        "ce": fwd_bwd(lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)),
        "baseline": fwd_bwd(lambda: rankops.compensated_cross_entropy(
            F.linear(hidden, weight), targets, LAM, backend="cpu")),
        "linear": fwd_bwd(lambda: rankops.compensated_linear_cross_entropy(
            hidden, weight, targets, LAM, backend="cpu")),
    }
    want, got = fns["baseline"](), fns["linear"]()  # the check (time_interleaved warms each up again)
    grad_tol = 1e-3 if dtype == torch.float32 else 2e-2
    loss_err = abs(float(got[0]) - float(want[0])) / abs(float(want[0]))
    grad_err = [float((a.double() - b.double()).abs().max() / b.double().abs().max())
                for a, b in zip(got[1:], want[1:])]
    assert loss_err < 1e-4, loss_err
    assert max(grad_err) < grad_tol, grad_err
    del want, got
    ms = time_interleaved(fns, rounds, "cpu")
    peak = {name: host_peak_extra_mb(fns[name]) for name in fns}
    logits_mb = n * v * hidden.element_size() / 2 ** 20
    row = dict(
        environment("cpu"), device="cpu", op="compensated_linear_cross_entropy", what="forward+backward (grads of hidden, weight)",
        lam=LAM, dtype=dtype_name, N=n, D=d, V=v, rounds=rounds,
        ms_ce=round(ms["ce"], 1), ms_baseline=round(ms["baseline"], 1), ms_linear=round(ms["linear"], 1),
        time_ratio_vs_baseline=round(ms["linear"] / ms["baseline"], 3),
        time_ratio_vs_ce=round(ms["linear"] / ms["ce"], 3),
        logits_mb=round(logits_mb, 1), grads_mb=round((n + v) * d * hidden.element_size() / 2 ** 20, 1),
        peak_extra_mb_ce=round(peak["ce"], 1),
        peak_extra_mb_baseline=round(peak["baseline"], 1), peak_extra_mb_linear=round(peak["linear"], 1),
        memory_ratio_vs_baseline=round(peak["linear"] / peak["baseline"], 4),
        loss_rel_diff=loss_err, grad_rel_diff_hidden=grad_err[0], grad_rel_diff_weight=grad_err[1])
    print(f"{dtype_name} N={n} D={d} V={v}, lam={LAM}, forward+backward: F.linear+F.cross_entropy "
          f"{ms['ce']:.0f} ms, F.linear+compensated_cross_entropy {ms['baseline']:.0f} ms, "
          f"compensated_linear_cross_entropy {ms['linear']:.0f} ms ({row['time_ratio_vs_baseline']:.2f}x "
          f"baseline, {row['time_ratio_vs_ce']:.2f}x ce); peak extra memory {peak['ce']:.0f} / "
          f"{peak['baseline']:.0f} / {peak['linear']:.0f} MB ({row['memory_ratio_vs_baseline']:.3f}x "
          f"baseline; logits {logits_mb:.0f} MB); loss diff {loss_err:.1e}, grad diff "
          f"{grad_err[0]:.1e} / {grad_err[1]:.1e}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "D", "V"), default=None,
                   help="one shape instead of the default ones")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 quick, 3 full)")
    p.add_argument("--json", default=RESULTS, help="JSONL file the rows are appended to ('' for none)")
    args = p.parse_args()
    rounds = args.rounds or (5 if args.quick else 3)
    shapes = [tuple(args.shape)] if args.shape else QUICK_SHAPES if args.quick else SHAPES
    for n, d, v in shapes:
        for dtype_name in args.dtypes:
            row = run_case(dtype_name, n, d, v, rounds)
            row["quick"] = args.quick
            row["load_average_1min"] = round(os.getloadavg()[0], 1)
            if args.json:
                os.makedirs(os.path.dirname(args.json), exist_ok=True)
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            gc.collect()


if __name__ == "__main__":
    main()
