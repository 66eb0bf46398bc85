"""The rankops command line: one module per command, the parser and the dispatch here.

    rankops eval       decompose a model's cross-entropy on corpora       (rankops.cli.eval)
    rankops fit        the paper's scaling tables from results files      (rankops.cli.fit)
    rankops plot       the paper's figures from results files             (rankops.cli.plot)
    rankops lm-eval    lm-evaluation-harness with the hf-rankops model    (rankops.cli.lm_eval)
    rankops corpora    the built-in corpora                               (rankops.cli.corpora)
    rankops selfcheck  this installation against the known-answer case   (rankops.cli.selfcheck)
    rankops bench      the kernels checked, then timed against baselines (rankops.cli.bench)

Each command module has `add_parser(subparsers)` and `run(args) -> exit status`; heavy imports
(torch, transformers, lm-eval) happen inside `run`, so `rankops --help` stays fast.
"""
import argparse
import sys

from rankops.cli import bench, corpora, eval, fit, lm_eval, plot, selfcheck

COMMANDS = {"eval": eval, "fit": fit, "plot": plot, "lm-eval": lm_eval, "corpora": corpora,
            "selfcheck": selfcheck, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankops", description="What your cross-entropy is made of: "
                                "Error-Entropy, Self-Alignment and Confidence (arXiv 2510.04067).")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        return lm_eval.main(argv[1:])
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
