"""How biased is the GPU's exp2 instruction on the sums the kernels compute?

On an H100, token_stats' logp read 3-4e-8 high on average when the kernels computed exp with
the GPU's exp2 instruction (MUFU.EX2, what `tl.exp2`, `exp2f` and `__expf` become): the sum
of exponentials came out low. The kernels now use a degree-6 polynomial on the FMA units,
unbiased but ~18 of the ~38 instructions per element that make both kernels instruction-bound
(bench/kernel_census.py, bench/NOTES-gpu.md).

A per-term correction cannot help: the bias is about half an ulp, so y * (1 + c) rounds back
to y. What could: correcting each slice's *sum* once, S * (1 - e), if the sum's mean relative
error e is the same whatever the arguments look like. This script measures e on the GPU for
arguments shaped like the kernels' (x - max of a row, times log2(e)): uniform in [-30, 0],
Gaussian logits of std 3 in fp32, the same rounded to bf16 (a grid), and peaked rows (a few
logits lifted by up to 10, as tests/test_logp_bias.py's sample). If the values of e agree to
~2e-9, one multiply per slice replaces the polynomial (bound on logp's mean error: 2e-8).

    python bench/exp2_error.py                  # on a GPU (seconds)
    TRITON_INTERPRET=1 python bench/exp2_error.py --rows 64   # the logic on a CPU (numpy's
                                                 # exp2 there: only its own rounding)
"""
import argparse
import json
import math
import sys

import torch
import triton
import triton.language as tl

from rankops.ops.common import triton_interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _exp2_kernel(t_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, tl.exp2(t), mask=offs < n)


def gpu_exp2(t):
    y = torch.empty_like(t)
    _exp2_kernel[(triton.cdiv(t.numel(), 4096),)](t, y, t.numel(), BLOCK=4096)
    return y


def arguments(kind, rows, cols, g):
    """t = (x - row max) * log2(e) in fp32, [rows, cols], for one kind of row."""
    if kind == "uniform":
        return (-30 * torch.rand(rows, cols, generator=g, dtype=torch.float64)).float()
    z = torch.randn(rows, cols, generator=g) * 3.0
    if kind == "peaked":
        lifted = torch.randint(0, cols, (rows, cols // 48), generator=g)
        z.scatter_add_(1, lifted, 10.0 * torch.rand(lifted.shape, generator=g))
    if kind == "gaussian_bf16":
        z = z.bfloat16().float()
    d = z - z.max(dim=1, keepdim=True).values
    return (d * LOG2E).float()


def sum_error(t, y):
    """Per row: the relative error of the row's sum of exp2(t); returns mean and its s.e."""
    t64, y64 = t.double().cpu(), y.double().cpu()
    exact = torch.exp2(t64).sum(dim=1)
    rel = y64.sum(dim=1) / exact - 1
    return rel.mean().item(), (rel.std() / math.sqrt(rel.numel())).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--json", metavar="PATH", help="append the results as one JSON line")
    args = p.parse_args(argv)
    interpreted = triton_interpreted()
    if not torch.cuda.is_available() and not interpreted:
        sys.exit("exp2_error: needs a GPU (or TRITON_INTERPRET=1 to check the logic on a CPU)")
    device = "cpu" if interpreted else "cuda"
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
           "triton": triton.__version__, "torch": torch.__version__, "rows": args.rows,
           "cols": args.cols, "sum_rel_error": {}}
    print(f"device {out['device']}, triton {out['triton']}: the mean relative error of a row's "
          f"sum of exp2, {args.rows} rows of {args.cols}")
    for kind in ("uniform", "gaussian", "gaussian_bf16", "peaked"):
        t = arguments(kind, args.rows, args.cols, g)
        mean, se = sum_error(t, gpu_exp2(t.to(device)))
        out["sum_rel_error"][kind] = {"mean": mean, "se": se}
        print(f"  {kind:<14} {mean:+.3e} (s.e. {se:.1e})")
    means = [v["mean"] for v in out["sum_rel_error"].values()]
    spread = max(means) - min(means)
    out["spread"] = spread
    print(f"spread across kinds {spread:.2e}: a constant correction of each slice's sum is "
          f"{'plausible' if spread < 2e-9 else 'not enough'} (logp's bias bound is 2e-8; keep a "
          "margin of 10)")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
