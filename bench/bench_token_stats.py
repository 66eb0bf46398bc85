"""Benchmark of rankops.token_stats on the issues' shapes: `rankops bench` with other defaults.

The checks, timing, baselines, row format and table live in rankops.bench (its docstring says
what is checked and how each baseline is timed); this script only chooses the cases the
performance issues name: on the CPU 2048 tokens with V = 50304 and 128256, on a GPU
rankops.bench.CUDA_SHAPES (2^31-logit shapes, Llama 3's vocabulary, few rows with V = 262144).
bench/gpu_suite.sh runs it.

    python bench/bench_token_stats.py                       # the CPU cases of the core issue
    python bench/bench_token_stats.py --device cuda --json bench/results/token_stats_cuda.jsonl
    TRITON_INTERPRET=1 python bench/bench_token_stats.py --shapes 4x1000 --backends cpu triton \\
        --baselines all --compile-backend eager              # every code path, tiny, on a CPU
"""
import argparse
import sys

from rankops.bench import add_arguments, run_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, profile="issue")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu"  # this script's cases are chosen per device: name the GPU explicitly
    return run_from_args(args, profile="issue")


if __name__ == "__main__":
    sys.exit(main())
