"""Benchmark of rankops.compensated_cross_entropy, forward plus backward: check, then time.

Each case (dtype, N, V) is first checked: the kernel backends' loss and gradient against the
pure-torch backend, and at lam = 0 against F.cross_entropy. Then forward + backward of every
candidate is timed, taking turns round by round (ratios hold on a shared machine; absolute
times do not), and each candidate's peak memory beyond its inputs is measured: on a GPU with
the allocator's peak counter, on the CPU as the peak resident memory of a fresh process that
runs the candidate once, its peak reset just before. The gradient itself (N*V in the logits'
dtype) is part of every candidate's peak and is reported next to it.

Candidates (lam = 0.3 for rankops; the baselines compute plain cross-entropy):
  rankops-<backend>  the fused kernels (cpu; cuda, triton on a GPU)
  rankops-torch      the same loss written in torch (rankops' reference backend)
  torch              F.cross_entropy on the logits as they are
  torch-fp32         F.cross_entropy on logits.float(), as transformers' ForCausalLMLoss does
  torch-compiled     F.cross_entropy under torch.compile (GPU only)
  liger              Liger-Kernel's fused cross-entropy (GPU, if installed)

Then the backward pass alone, per kernel backend (rows with op "softmax_grad"): the compensated
loss's backward (its per-row weights, then the softmax_grad kernel: one read of the logits, one
write of the gradient) against a device-to-device copy of the logits, both counted as read +
write bytes, so grad_frac = 1 would be copy speed (the GPU issue's target: >= 0.9).

    python bench/bench_compensated_cross_entropy.py
    python bench/bench_compensated_cross_entropy.py --device cuda --json bench/results/compensated_cross_entropy_cuda.jsonl
"""
import argparse
import json
import multiprocessing as mp
import os
import sys

import torch
import torch.nn.functional as F

import rankops
from rankops.bench import DTYPES, environment, host_peak_extra_mb, l2_flush, time_interleaved
from rankops.bench import peak_extra_mb as cuda_peak_extra_mb
from rankops.bench import fmt as _fmt
from rankops.ops.common import triton_interpreted

LAM = 0.3
DEFAULTS = {"cpu": ([2048], [50304, 128256]), "cuda": ([4096, 16384], [50304, 128256, 151936])}


def make_case(n_rows, n_vocab, dtype, device, seed=0):
    """Filled block by block, so no temporary larger than a block exists (the CPU memory
    measurement reads the process's peak resident memory)."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(n_rows, n_vocab, dtype=dtype, device=device)
    for start in range(0, n_rows, 256):
        block = logits[start:start + 256]
        block.copy_(torch.randn(block.shape, generator=g, device=device) * 3.0)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g, device=device)
    targets[::17] = -100
    return logits, targets


def candidates(device, backends, compile_backend="inductor"):
    """name -> fn(logits_leaf, targets) running forward and backward."""
    sync_free = dict(check_finite=False, validate=False) if device == "cuda" else {}
    fns = {}
    for b in backends + ["torch"]:
        fns[f"rankops-{b}"] = (lambda b: lambda x, t: rankops.compensated_cross_entropy(
            x, t, LAM, backend=b, **sync_free).backward())(b)
    fns["torch"] = lambda x, t: F.cross_entropy(x, t).backward()
    fns["torch-fp32"] = lambda x, t: F.cross_entropy(x.float(), t).backward()
    if device == "cuda" or compile_backend != "inductor":
        compiled = torch.compile(F.cross_entropy, backend=compile_backend, dynamic=False)
        fns["torch-compiled"] = lambda x, t: compiled(x, t).backward()
    if device == "cuda" or triton_interpreted():
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
            fns["liger"] = lambda x, t: liger_cross_entropy(x, t).backward()
        except ImportError:
            pass
    return fns


def check(backends, logits, targets):
    x = logits.detach().clone().requires_grad_(True)
    want_loss = rankops.compensated_cross_entropy(x, targets, LAM, backend="torch")
    want_loss.backward()
    want = x.grad
    y = logits.detach().float().clone().requires_grad_(True)
    F.cross_entropy(y, targets).backward()
    for b in backends:
        x = logits.detach().clone().requires_grad_(True)
        loss = rankops.compensated_cross_entropy(x, targets, LAM, backend=b)
        loss.backward()
        if abs(loss.item() - want_loss.item()) > 1e-4 * abs(want_loss.item()):
            sys.exit(f"FAIL: backend {b}'s loss {loss.item()} differs from the torch backend's {want_loss.item()}")
        err = ((x.grad.double() - want.double()).abs().max() / want.double().abs().max()).item()
        if err > 1e-2:
            sys.exit(f"FAIL: backend {b}'s gradient differs from the torch backend's by {err:.3g} (relative)")
        x = logits.detach().clone().requires_grad_(True)
        rankops.compensated_cross_entropy(x, targets, 0.0, backend=b).backward()
        err = ((x.grad.double() - y.grad.double()).abs().max() / y.grad.double().abs().max()).item()
        if err > 1e-2:
            sys.exit(f"FAIL: backend {b} at lam=0 differs from F.cross_entropy by {err:.3g} (relative)")


def _rss_child(queue, name, n_rows, n_vocab, dtype_name, backends):
    torch.set_num_threads(torch.get_num_threads())
    logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], "cpu")
    fn = candidates("cpu", backends)[name]
    # One small call first: the first call into torch or the extension pays one-off costs
    # (thread pools, lazy initialisation) that are not the candidate's memory.
    small_logits, small_targets = make_case(8, 1000, DTYPES[dtype_name], "cpu")
    fn(small_logits.requires_grad_(True), small_targets)
    x = logits.requires_grad_(True)
    # The peak is reset to the current resident size just before the call, so temporaries
    # freed before (those of make_case) do not hide the candidate's own peak.
    queue.put(host_peak_extra_mb(lambda: fn(x, targets)))


def peak_extra_mb(device, name, fn, logits, targets, backends):
    if device == "cuda":
        x = logits.detach().clone().requires_grad_(True)
        return round(cuda_peak_extra_mb(lambda: fn(x, targets), "cuda"), 1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    dtype_name = next(k for k, v in DTYPES.items() if v == logits.dtype)
    proc = ctx.Process(target=_rss_child, args=(queue, name, logits.shape[0], logits.shape[1],
                                                 dtype_name, backends))
    proc.start()
    proc.join()
    return round(queue.get(timeout=5), 1) if proc.exitcode == 0 else None


def time_softmax_grad(device, backends, logits, targets, repeat, flush, env, dtype_name):
    """The backward pass alone (the compensated loss's per-row weights and the softmax_grad
    kernel) against a copy of the logits; returns one row per backend."""
    sync_free = dict(check_finite=False, validate=False) if device == "cuda" else {}
    n_rows, n_vocab = logits.shape
    nbytes = logits.numel() * logits.element_size()
    scratch = torch.empty_like(logits)
    fns = {"copy": lambda: scratch.copy_(logits)}
    for b in backends:
        x = logits.detach().requires_grad_(True)  # a new leaf on the same storage
        loss = rankops.compensated_cross_entropy(x, targets, LAM, backend=b, **sync_free)
        fns[b] = (lambda loss, x: lambda: torch.autograd.grad(loss, x, retain_graph=True))(loss, x)
    ms = time_interleaved(fns, repeat, device, flush)
    copy_gbps = 2 * nbytes / 1e6 / ms["copy"]
    rows = []
    for b in backends:
        moved = 2 * nbytes + n_rows * (8 + 4 + 4)  # logits in, gradient out; targets, lse, scale
        gbps = moved / 1e6 / ms[b]
        rows.append(dict(env, op="softmax_grad", backend=b, device=device, dtype=dtype_name, N=n_rows,
                         V=n_vocab, ms=round(ms[b], 4), bytes=moved, gbps=round(gbps, 2),
                         copy_gbps=round(copy_gbps, 2), grad_frac=round(gbps / copy_gbps, 3)))
        print(f"softmax_grad {b:<8} {dtype_name:<5} {n_rows:>6} {n_vocab:>7} {ms[b]:>9.3f} ms "
              f"{gbps:>8.1f} GB/s = {gbps / copy_gbps:.2f} of copy ({copy_gbps:.1f} GB/s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--n", nargs="+", type=int, default=None)
    p.add_argument("--v", nargs="+", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 7 CPU, 25 CUDA)")
    p.add_argument("--backends", nargs="+", default=None, help="default: every available one on the device but torch")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for torch-compiled (on a CPU: only when not inductor)")
    p.add_argument("--no-cpu-memory", action="store_true",
                   help="skip the CPU peak-memory measurement (a fresh process per candidate)")
    p.add_argument("--json", metavar="PATH", help="append the rows as JSON lines to PATH")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    repeat = args.repeat or (25 if args.device == "cuda" else 7)
    on_device = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}[args.device]
    backends = args.backends or [b for b in rankops.available_backends() if b in on_device]
    flush = l2_flush(args.device)
    # torch's own switch for 2 MB pages in its CPU allocator: it changes what a fresh [N, V]
    # gradient costs (page faults), so it is recorded with the rows.
    env = dict(environment(args.device), THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"# fwd+bwd, lam={LAM}; grad_MB is the gradient's own size, part of every peak")
    print(f"{'candidate':<16} {'dtype':<5} {'N':>6} {'V':>7} {'ms':>9} {'vs_torch':>8} {'vs_fp32':>8} "
          f"{'vs_compiled':>11} {'vs_liger':>8} {'peak_MB':>8} {'grad_MB':>8}")
    for dtype_name in args.dtypes:
        for n_vocab in args.v or DEFAULTS[args.device][1]:
            for n_rows in args.n or DEFAULTS[args.device][0]:
                torch._dynamo.reset()  # static shapes per case, no recompile limit across cases
                logits, targets = make_case(n_rows, n_vocab, DTYPES[dtype_name], args.device)
                check(backends, logits, targets)
                fns = candidates(args.device, backends, args.compile_backend)
                leaves = {name: logits.detach().clone().requires_grad_(True) for name in fns}

                def timed(name, fn):
                    def call():
                        leaves[name].grad = None
                        fn(leaves[name], targets)
                    return call

                ms = time_interleaved({name: timed(name, fn) for name, fn in fns.items()}, repeat, args.device, flush)
                del leaves
                grad_mb = round(logits.numel() * logits.element_size() / 2**20, 1)
                rows = []
                for name, fn in fns.items():
                    row = dict(env, op="compensated_cross_entropy", candidate=name, device=args.device,
                               dtype=dtype_name, N=n_rows, V=n_vocab, lam=LAM, ms=round(ms[name], 3),
                               speedup_vs_torch=round(ms["torch"] / ms[name], 2),
                               speedup_vs_torch_fp32=round(ms["torch-fp32"] / ms[name], 2),
                               speedup_vs_compiled=round(ms["torch-compiled"] / ms[name], 2) if "torch-compiled" in ms else None,
                               speedup_vs_liger=round(ms["liger"] / ms[name], 2) if "liger" in ms else None,
                               peak_extra_mb=None if args.device == "cpu" and args.no_cpu_memory else
                               peak_extra_mb(args.device, name, fn, logits, targets, backends),
                               grad_mb=grad_mb)
                    rows.append(row)
                    print(f"{name:<16} {dtype_name:<5} {n_rows:>6} {n_vocab:>7} {ms[name]:>9.2f} "
                          f"{row['speedup_vs_torch']:>8g} {row['speedup_vs_torch_fp32']:>8g} "
                          f"{_fmt(row['speedup_vs_compiled']):>11} {_fmt(row['speedup_vs_liger']):>8} "
                          f"{_fmt(row['peak_extra_mb']):>8} {grad_mb:>8g}", flush=True)
                rows += time_softmax_grad(args.device, backends, logits, targets, repeat, flush, env, dtype_name)
                if args.json:  # case by case, so an interrupted run keeps what it measured
                    with open(args.json, "a") as f:
                        for row in rows:
                            f.write(json.dumps(row) + "\n")
                del logits, targets, fns


if __name__ == "__main__":
    main()
