"""A/B of rankops builds on the CPU kernel: one timing sample per call, for interleaving.

Each build lives in its own checkout and environment (for instance a `git worktree` of an older
commit with its own venv and `pip install -e .`); run this script with each build's python in
turn, several rounds, and compare the medians: the builds share the machine's state in the same
minutes, so their ratio holds where absolute times drift.

    for i in 1 2; do for py in /work/wt-old/.venv/bin/python .venv/bin/python; do
        $py bench/ab_builds.py; done; done

Prints one JSON line: the rankops it imported and the median of 15 calls of
rankops.token_stats(z, t, backend="cpu") per case (2 threads, N(0, 9) logits, fp32 and bf16,
2048 x 50304 and 2048 x 128256), in ms. bench/results/token_stats_cpu_refactor_ab.jsonl holds
the issue-12 comparison made this way. It times with its own loop, not
rankops.bench.time_interleaved, and uses only rankops.token_stats, so that any build, however
old, can run it (5cf8cd6, the build before issue 12 in that file, has no rankops.bench).
"""
import json
import time

import torch

import rankops


def main():
    torch.set_num_threads(2)
    out = {"rankops": rankops.__file__}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, v in ((2048, 50304), (2048, 128256)):
            z = (torch.randn(n, v, generator=g) * 3).to(dtype)
            t = torch.randint(0, v, (n,), generator=g)
            rankops.token_stats(z, t, backend="cpu")  # warm-up
            times = []
            for _ in range(15):
                t0 = time.perf_counter()
                rankops.token_stats(z, t, backend="cpu")
                times.append(time.perf_counter() - t0)
            out[f"{str(dtype)[6:]} {n}x{v}"] = sorted(times)[len(times) // 2] * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
