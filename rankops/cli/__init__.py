"""The rankops command line: one module per command, the parser and the dispatch here.

    rankops eval       decompose a model's cross-entropy on corpora       (rankops.cli.eval)
    rankops fit        the paper's scaling tables from results files      (rankops.cli.fit)
    rankops plot       the paper's figures from results files             (rankops.cli.plot)
    rankops lm-eval    lm-evaluation-harness with the hf-rankops model    (rankops.cli.lm_eval)
    rankops corpora    the built-in corpora                               (rankops.cli.corpora)
    rankops cache      what rankops keeps in its cache folder; clear it   (rankops.cli.cache)
    rankops selfcheck  this installation against the known-answer case   (rankops.cli.selfcheck)
    rankops bench      the kernels checked, then timed against baselines (rankops.cli.bench)

Each command module has `add_parser(subparsers)` and `run(args) -> exit status`; heavy imports
(torch, transformers, lm-eval) happen inside `run`, so `rankops --help` stays fast.
"""
import argparse
import sys

from rankops.cli import bench, cache, corpora, eval, extras, fit, lm_eval, plot, selfcheck

COMMANDS = {"eval": eval, "fit": fit, "plot": plot, "lm-eval": lm_eval, "corpora": corpora,
            "cache": cache, "selfcheck": selfcheck, "bench": bench}


def version_text() -> str:
    """rankops' version, torch's, and the kernel backends this installation has."""
    import torch

    import rankops
    from rankops import _ext
    backends = rankops.available_backends()
    if _ext.IMPORT_ERROR is not None:
        compiled = f"none ({_ext.IMPORT_ERROR})"
    else:
        compiled = f"CPU ({_ext.cpu_isa()})" + (", CUDA" if _ext.has_cuda_kernel() else ", no CUDA")
    return (f"rankops {rankops.__version__} (torch {torch.__version__}; compiled kernels: {compiled}; "
            f"backends here: {', '.join(backends)})")


class _VersionAction(argparse.Action):
    """--version, with the imports it needs only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankops", description="What your cross-entropy is made of: "
                                "Error-Entropy, Self-Alignment and Confidence (arXiv 2510.04067).")
    p.add_argument("--version", action=_VersionAction,
                   help="print rankops' version, torch's, and the kernel backends built, then exit")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        return lm_eval.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except ModuleNotFoundError as exc:  # an optional dependency imported late: one line, not a traceback
        if exc.name is None or exc.name.split(".")[0] not in extras.EXTRA_OF:
            raise
        print(f"rankops {args.command}: error: {extras.missing_message(exc.name)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
