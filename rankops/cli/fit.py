"""`rankops fit`: the paper's scaling tables from `rankops eval` results files."""
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    f = sub.add_parser("fit", help="the paper's scaling tables from results files",
                       description="Fits CE, EE, SA and Conf against non-embedding parameters per model "
                       "family and corpus (and all families together), and prints R^2 and scaling "
                       "differences as markdown.")
    f.add_argument("results", nargs="+", help="results.json files or folders holding them")
    f.add_argument("--output", metavar="STEM", help="also write STEM.md and STEM.json")


def run(args) -> int:
    from rankops.atomic import write_atomic
    from rankops.scaling import load_results, markdown, scaling_tables
    try:
        rows = scaling_tables(load_results(args.results))
    except ValueError as exc:
        print(f"rankops fit: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(rows)
    print(text)
    if args.output:
        write_atomic(Path(args.output + ".md"), (text + "\n").encode())
        write_atomic(Path(args.output + ".json"), (json.dumps(rows, indent=2) + "\n").encode())
    return 0
