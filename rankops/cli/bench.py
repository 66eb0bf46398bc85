"""`rankops bench`: on this machine and device, check every available backend of token_stats
against the reference, then time it against baselines of the same run (rankops.bench, the one
benchmark implementation; bench/bench_token_stats.py is the same with the issues' shapes)."""

def add_parser(sub) -> None:
    from rankops.bench import add_arguments
    p = sub.add_parser(
        "bench", help="check the kernels against the reference, then time them against baselines",
        description="Checks every backend of token_stats against the reference (ranks and ties "
                    "exactly, logp within the tests' bound against float64 truth), then times them "
                    "against baselines measured in the same run: a progress line per case, a table "
                    "at the end, --json rows in bench/results' format. Exit status 1 if a check fails.")
    add_arguments(p, profile="quick")


def run(args) -> int:
    from rankops.bench import run_from_args
    return run_from_args(args, profile="quick")
