"""`rankops fit`: per-model tables and the paper's scaling tables from `rankops eval` results."""
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    f = sub.add_parser("fit", help="per-model tables and the paper's scaling tables from results files",
                       description="Prints each model's CE, EE, SA and Conf and their ratios to CE "
                       "(one model on one corpus is enough). Where a corpus has two or more model "
                       "sizes, also fits CE, EE, SA and Conf against non-embedding parameters per "
                       "model family and corpus (and all families together), and prints R^2 and "
                       "scaling differences, as markdown.")
    f.add_argument("results", nargs="+", help="results.json files or folders holding them")
    f.add_argument("--output", metavar="STEM",
                   help="also write STEM.md and STEM.json ({\"models\": [...], \"fits\": [...]})")


def run(args) -> int:
    from rankops.atomic import write_atomic
    from rankops.scaling import (NO_POWER_LAW, load_results, markdown, model_rows, models_markdown,
                                 scaling_tables)
    try:
        results = load_results(args.results)
        models = model_rows(results)
        fits = scaling_tables(results, allow_empty=True)
    except ValueError as exc:
        print(f"rankops fit: error: {exc}", file=sys.stderr)
        return 2
    text = models_markdown(models) + "\n\n" + (markdown(fits) if fits else NO_POWER_LAW)
    print(text)
    if args.output:
        write_atomic(Path(args.output + ".md"), (text + "\n").encode())
        payload = {"models": models, "fits": fits}
        write_atomic(Path(args.output + ".json"), (json.dumps(payload, indent=2) + "\n").encode())
    return 0
