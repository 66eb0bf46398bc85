"""The GPU issue's targets, pass or fail, from the rows the benchmarks wrote (JSON lines).

    python bench/gpu_summary.py bench/results/*_cuda.jsonl [--status STATUS_FILE]

Each target reads one field of the rows (see bench/NOTES-gpu.md for what each one means). A
target with no row to read is "n/a", never a pass. --status adds the suite's step results
(build, tests, sanitizer) as lines "step: ok|FAIL|skipped: detail".
"""
import argparse
import json


def load(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            pass
    return rows


def pick(rows, **want):
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def target(label, values, op, threshold, fmt="{:.4g}"):
    """values: [(value, where)]; the worst one decides. op: '>=' or '<='."""
    values = [(v, w) for v, w in values if v is not None]
    if not values:
        return (label, "n/a", f"{op} {threshold:g}", "n/a", "")
    worst = min(values) if op == ">=" else max(values)
    ok = worst[0] >= threshold if op == ">=" else worst[0] <= threshold
    return (label, fmt.format(worst[0]), f"{op} {threshold:g}", "PASS" if ok else "FAIL", worst[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--status", help="the suite's step results, one 'step: result' a line")
    p.add_argument("--headline", default="16384x131072", help="the shape of the bandwidth targets, NxV")
    p.add_argument("--few-rows-v", type=int, default=262144, help="V of the few-row (N <= 64) target")
    args = p.parse_args()
    rows = load(args.jsonl)
    hn, hv = (int(x) for x in args.headline.split("x"))
    ts = [r for r in rows if r.get("op") == "token_stats"]
    device = next((r["device"] for r in ts), None)
    where = lambda r: f"{r['dtype']} {r['N']}x{r['V']}"
    out = []
    for b, frac in (("cuda", 0.95), ("triton", 0.85)):
        head = pick(ts, backend=b, N=hn, V=hv, dtype="bf16")
        out.append(target(f"{b}: pure-read fraction, bf16 {args.headline}", [(r["bw_frac"], where(r)) for r in head], ">=", frac))
    for b in ("cuda", "triton"):
        head = pick(ts, backend=b, N=hn, V=hv)
        out.append(target(f"{b}: x compiled F.cross_entropy, {args.headline}",
                          [(r["speedup_vs_ce_compiled"], where(r)) for r in head], ">=", 2.3))
        out.append(target(f"{b}: x serving-engine rank, {args.headline}",
                          [(r["speedup_vs_serving_rank"], where(r)) for r in head], ">=", 3.0))
        few = [r for r in pick(ts, backend=b, V=args.few_rows_v) if r["N"] <= 64]
        out.append(target(f"{b}: pure-read fraction, N <= 64, V = {args.few_rows_v}",
                          [(r["bw_frac"], where(r)) for r in few], ">=", 0.5))
        acc = pick(ts, backend=f"acc_{b}", N=hn, V=hv)
        out.append(target(f"{b}: accumulate / token_stats, {args.headline}",
                          [(r["acc_over_token_stats"], where(r)) for r in acc], "<=", 1.05))
    for b in ("cuda", "triton"):
        grad = pick(rows, op="softmax_grad", backend=b)
        out.append(target(f"{b}: softmax_grad / copy bandwidth", [(r["grad_frac"], where(r)) for r in grad], ">=", 0.9))
    ev = pick(rows, op="eval_overhead")
    out.append(target("metric / SmolLM2 forward time", [(r["overhead"], f"{r['dtype']} {r['n_tokens']} tokens") for r in ev],
                      "<=", 0.01, "{:.2%}"))

    info = []  # measured, no target: the extra memory and the headline numbers
    for r in pick(ts, N=hn, V=hv):
        if r["backend"] in ("cuda", "triton", "read_amax", "read_triton", "copy", "ce_compiled", "liger", "serving_rank"):
            info.append(f"  {r['backend']:<13} {r['dtype']:<5} {r['ms']:>9.3f} ms {r['gbps']:>8.1f} GB/s"
                        f"  extra {r['peak_extra_mb'] if r['peak_extra_mb'] is not None else '-'} MB")
    env = (ts or rows or [{}])[0]
    print()
    print(f"== summary: {env.get('gpu') or env.get('processor', '?')} (device {device}), driver {env.get('driver')}, "
          f"CUDA {env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}")
    if args.status:
        try:
            with open(args.status) as f:
                for line in f:
                    if line.strip():
                        print("  step " + line.rstrip())
        except FileNotFoundError:
            pass
    width = max(len(t[0]) for t in out)
    print(f"  {'target':<{width}}  {'worst':>8}  {'goal':>8}  {'':<4}  where")
    for label, value, goal, verdict, at in out:
        print(f"  {label:<{width}}  {value:>8}  {goal:>8}  {verdict:<4}  {at}")
    if info:
        print(f"  headline {args.headline} (ms, GB/s counted as the row's bytes, peak extra memory):")
        print("\n".join(info))


if __name__ == "__main__":
    main()
