"""`rankops plot`: the paper's figures from `rankops eval` results files (rankops.plot)."""
import sys


def add_parser(sub) -> None:
    pl = sub.add_parser("plot", help="the paper's figures from results files (PNG and PDF)",
                        description="Draws every figure the results support (one model on one "
                        "corpus: the rank distribution, P against Q and the shares) and prints the "
                        "files written.")
    pl.add_argument("results", nargs="+", help="results.json files or folders holding them")
    pl.add_argument("--output-dir", default="rankops_figures", help="(default: %(default)s)")


def run(args) -> int:
    from rankops.cli.extras import first_missing
    missing = first_missing("matplotlib")  # before anything, so that no empty folder is left
    if missing:
        print(f"rankops plot: error: {missing}", file=sys.stderr)
        return 2
    from rankops.plot import plot_all
    from rankops.scaling import load_results
    try:
        paths = plot_all(load_results(args.results), args.output_dir)
    except ValueError as exc:
        print(f"rankops plot: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    # Where the figures went, and why any was not drawn: one model on one corpus gets the rank
    # distribution, P against Q and the shares; the rest need more results.
    from pathlib import Path
    from rankops.plot import NEEDS
    drawn = {Path(p).stem for p in paths}
    print(f"rankops plot: {len(drawn)} figures (PNG and PDF) in {Path(args.output_dir).resolve()}",
          file=sys.stderr)
    for name, needs in NEEDS.items():
        if name not in drawn:
            print(f"rankops plot: {name} not drawn: it needs {needs}", file=sys.stderr)
    return 0
