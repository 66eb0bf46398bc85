"""Benchmark of rankops.linear_token_stats (the fused output layer), on the CPU or a GPU.

CPU candidates, per case (dtype, N, D, V), each on the same inputs:
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

GPU candidates (--device cuda, the default where a GPU is present), timed with CUDA events:
  matmul   F.linear alone
  baseline F.linear, then rankops.token_stats (auto: the CUDA or Triton kernel)
  triton   rankops.linear_token_stats(backend="triton"): fused, no [N, V] tensor
  cce      Cut Cross-Entropy's linear_cross_entropy (apple/ml-cross-entropy), if importable
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss, if importable
cce and liger give the mean loss only (no rank, no ties): loss-only baselines for the cost of
fusing the output layer, checked against -mean(logp) of the baseline. triton is checked against
the baseline as linear is on the CPU. Peak extra memory: torch.cuda.max_memory_allocated during
one call over the allocated memory before it.

    python bench/bench_linear_token_stats.py --quick      # small shapes, seconds
    python bench/bench_linear_token_stats.py              # the issue's shapes (minutes, ~9 GB)
Rows are appended as JSONL to bench/results/linear_token_stats_{cpu,gpu}.jsonl.
"""
import argparse
import gc
import json
import os

import torch
import torch.nn.functional as F

import rankops
from rankops.bench import environment, host_peak_extra_mb, peak_extra_mb, time_interleaved

SHAPES = [(8192, 640, 262144), (8192, 576, 49152)]  # (N, D, V): the two cases
QUICK_SHAPES = [(512, 64, 40000), (256, 96, 70000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPES_GPU = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


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
    want, got = fns["baseline"](), fns["linear"]()  # the check (time_interleaved warms each up again)
    mismatch = float((got.rank != want.rank).float().mean())
    logp_err = float((got.logp - want.logp).abs().max())
    assert mismatch < 0.01 and float((got.ties != want.ties).float().mean()) < 0.01, mismatch
    assert logp_err < 1e-3, logp_err
    del want, got
    ms = time_interleaved(fns, rounds, "cpu")
    peak = {name: host_peak_extra_mb(fns[name]) for name in ("baseline", "linear")}
    logits_mb = n * v * hidden.element_size() / 2 ** 20
    row = dict(
        environment("cpu"), device="cpu", op="linear_token_stats",
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


def _loss_baselines():
    """The fused linear cross-entropy losses that are installed: name -> fn(hidden, weight,
    targets) giving the mean loss over the kept tokens."""
    found = {}
    try:
        from cut_cross_entropy import linear_cross_entropy
        found["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t, reduction="mean")
    except ImportError:
        pass
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        found["liger"] = lambda h, w, t: liger(w, h, t)
    except ImportError:
        pass
    return found


def run_case_gpu(dtype_name, n, d, v, rounds):
    dtype, dev = DTYPES_GPU[dtype_name], torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=dev).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=dev) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    fns = {
        "matmul": lambda: F.linear(hidden, weight),
        "baseline": lambda: rankops.token_stats(F.linear(hidden, weight), targets),
        "triton": lambda: rankops.linear_token_stats(hidden, weight, targets, backend="triton"),
    }
    losses = _loss_baselines()
    for name, loss in losses.items():
        fns[name] = (lambda loss=loss: loss(hidden, weight, targets))
    with torch.no_grad():
        want, got = fns["baseline"](), fns["triton"]()  # the check (time_interleaved warms each up again)
        mismatch = float((got.rank != want.rank).float().mean())
        logp_err = float((got.logp - want.logp).abs().max())
        ce = float(-want.logp.double().mean())
        assert mismatch < 0.01 and float((got.ties != want.ties).float().mean()) < 0.01, mismatch
        # One rounding of a logit of a few units in the inputs' dtype moves logp by as much.
        assert logp_err < (1e-3 if dtype == torch.float32 else 0.05), logp_err
        loss_err = {}
        for name in list(losses):
            try:
                loss_err[name] = abs(float(fns[name]()) - ce) / ce
            except Exception as e:  # e.g. a dtype the package does not take: leave it out, say so
                print(f"  {name} left out at {dtype_name}: {type(e).__name__}: {e}", flush=True)
                del fns[name], losses[name]
                continue
            assert loss_err[name] < 1e-2, (name, loss_err[name])
        del want, got
        ms = time_interleaved(fns, rounds, "cuda")
        peak = {name: peak_extra_mb(fn, "cuda") for name, fn in fns.items() if name != "matmul"}
    logits_mb = n * v * hidden.element_size() / 2 ** 20
    row = dict(
        environment("cuda"), device="cuda", op="linear_token_stats",
        dtype=dtype_name, N=n, D=d, V=v, rounds=rounds, logits_mb=round(logits_mb, 1),
        rank_mismatch_rate=mismatch, logp_max_abs_diff=logp_err,
        **{f"ms_{name}": round(t, 3) for name, t in ms.items()},
        **{f"peak_extra_mb_{name}": round(mb, 1) for name, mb in peak.items()},
        **{f"loss_rel_err_{name}": err for name, err in loss_err.items()},
        time_ratio_vs_baseline=round(ms["triton"] / ms["baseline"], 3),
        time_ratio_vs_matmul=round(ms["triton"] / ms["matmul"], 3),
        tflops_triton=round(2 * 2 * n * d * v / ms["triton"] / 1e9, 1))  # two passes of tiles
    others = ", ".join(f"{name} {ms[name]:.2f} ms ({peak[name]:.0f} MB)" for name in losses)
    print(f"{dtype_name} N={n} D={d} V={v}: matmul {ms['matmul']:.2f} ms, matmul+token_stats "
          f"{ms['baseline']:.2f} ms ({peak['baseline']:.0f} MB), triton {ms['triton']:.2f} ms "
          f"({peak['triton']:.0f} MB, {row['time_ratio_vs_baseline']:.2f}x)"
          + (f"; loss only: {others}" if others else "")
          + f"; rank mismatch {mismatch:.2e}, logp diff {logp_err:.1e}", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda if a GPU is present)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES_GPU),
                   help="default fp32 bf16 (fp16 on the GPU too)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 quick, 3 full on "
                   "the CPU; 20 on the GPU)")
    p.add_argument("--json", default=None, help="JSONL file the rows are appended to ('' for none; "
                   "default bench/results/linear_token_stats_<device>.jsonl)")
    args = p.parse_args()
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU")
    dtypes = args.dtypes or list(DTYPES_GPU if on_gpu else DTYPES)
    if not on_gpu and "fp16" in dtypes:
        p.error("the CPU cases are fp32 and bf16")
    rounds = args.rounds or (20 if on_gpu else 5 if args.quick else 3)
    json_path = args.json if args.json is not None else os.path.join(
        RESULTS_DIR, f"linear_token_stats_{'gpu' if on_gpu else 'cpu'}.jsonl")
    for n, d, v in QUICK_SHAPES if args.quick else SHAPES:
        for dtype_name in dtypes:
            row = (run_case_gpu if on_gpu else run_case)(dtype_name, n, d, v, rounds)
            row["quick"] = args.quick
            if json_path:
                os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
                with open(json_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            gc.collect()


if __name__ == "__main__":
    main()
