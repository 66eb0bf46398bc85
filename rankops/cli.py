"""The rankops command line: `rankops eval`, `rankops lm-eval`, `rankops corpora`, `rankops selfcheck`."""
import argparse
import json
import sys

DEFAULT_MAX_TOKENS = 20000


def _max_tokens(value: str):
    if value in ("all", "0"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'all'")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankops", description="What your cross-entropy is made of: "
                                "Error-Entropy, Self-Alignment and Confidence (arXiv 2510.04067).")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="decompose a model's cross-entropy on corpora",
                       description="Runs each model on each corpus and writes OUTPUT/<model>/<corpus>/"
                       "results.json with the decomposition; prints a markdown table.")
    e.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="a transformers folder, a .gguf file, 'smollm2', or a hub id; repeat for "
                        "several models or checkpoints")
    e.add_argument("--step", action="append", type=int, metavar="N",
                   help="training step of each --model, in order (default: read from names like "
                        "checkpoint-1000)")
    e.add_argument("--revision", action="append", metavar="REV",
                   help="hub revision of each --model, in order (hub models only)")
    e.add_argument("--corpus", action="append", required=True, metavar="CORPUS",
                   help="a built-in corpus (see `rankops corpora`), a text file or folder, .jsonl, "
                        ".parquet, a datasets folder, or a hub dataset id; repeatable")
    e.add_argument("--text-field", default="text", help="text field of jsonl/parquet/datasets corpora")
    e.add_argument("--split", default="train", help="split of a datasets corpus")
    e.add_argument("--output-path", default="rankops_results", help="results folder (default: %(default)s)")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    e.add_argument("--backend", default="auto", help="rankops kernel backend (default: fastest available)")
    e.add_argument("--n-documents", type=int, default=1000, help="documents after shuffling (default: 1000)")
    e.add_argument("--seed", type=int, default=42, help="document shuffle seed (default: 42)")
    e.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    e.add_argument("--stride", type=int, default=None,
                   help="sliding windows with this stride (default: disjoint windows)")
    e.add_argument("--no-bos", action="store_true", help="do not prepend BOS to documents")
    e.add_argument("--lm-eval-windows", action="store_true",
                   help="lm-evaluation-harness's rolling windows (what `rankops lm-eval` scores) instead")
    e.add_argument("--max-tokens", type=_max_tokens, default=DEFAULT_MAX_TOKENS,
                   help=f"scored-token budget per model and corpus; the default, {DEFAULT_MAX_TOKENS}, keeps "
                        "a CPU run to a few minutes; 'all' scores every selected document")
    e.add_argument("--batch-size", type=int, default=8, help="windows per batch at most")
    e.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch at most")
    e.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="checkpoint interval (default: %(default)s s)")
    e.add_argument("--no-progress", action="store_true")

    f = sub.add_parser("fit", help="the paper's scaling tables from results files",
                       description="Fits CE, EE, SA and Conf against non-embedding parameters per model "
                       "family and corpus (and all families together), and prints R^2 and scaling "
                       "differences as markdown.")
    f.add_argument("results", nargs="+", help="results.json files or folders holding them")
    f.add_argument("--output", metavar="STEM", help="also write STEM.md and STEM.json")

    pl = sub.add_parser("plot", help="the paper's figures from results files (PNG and PDF)")
    pl.add_argument("results", nargs="+", help="results.json files or folders holding them")
    pl.add_argument("--output-dir", default="rankops_figures", help="(default: %(default)s)")

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with the hf-rankops model: `rankops lm-eval [--corpus PATH] "
                        "LM-EVAL-RUN-ARGS` (see `rankops lm-eval --help`)")
    sub.add_parser("corpora", help="list the built-in corpora, their licenses and how to install them")
    sub.add_parser("selfcheck", help="check the installation against the known-answer case")
    return p


def cmd_eval(args) -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment) each process evaluates its share of the
    batches; process 0 writes the results and prints the table."""
    from rankops.distributed import destroy_eval_process_group
    try:
        return _eval(args)
    finally:
        destroy_eval_process_group()


def _eval(args) -> int:
    import torch

    from rankops.eval.corpora import CorpusError, load_corpus
    from rankops.eval.models import ModelError, load_model
    from rankops.eval.run import EvalError, evaluate, markdown_table
    from rankops.eval.windows import Protocol

    for name, values in (("--step", args.step), ("--revision", args.revision)):
        if values is not None and len(values) != len(args.model):
            print(f"rankops eval: error: {name} was given {len(values)} times for {len(args.model)} "
                  "models", file=sys.stderr)
            return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        print(f"rankops eval: error: --device {device} is not usable here: {exc}", file=sys.stderr)
        return 2
    from rankops.distributed import init_eval_process_group
    try:
        device, rank, world_size = init_eval_process_group(device)
    except (RuntimeError, ValueError) as exc:
        print(f"rankops eval: error: cannot start the distributed run: {exc}", file=sys.stderr)
        return 2
    try:
        protocol = Protocol(n_documents=args.n_documents, seed=args.seed, context_length=args.context_length,
                            stride=args.stride, add_bos=not args.no_bos, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, lm_eval_windows=args.lm_eval_windows)
        corpora = [load_corpus(c, text_field=args.text_field, split=args.split) for c in args.corpus]
    except (ValueError, CorpusError) as exc:
        print(f"rankops eval: error: {exc}", file=sys.stderr)
        return 2
    all_results = []
    for i, spec in enumerate(args.model):
        try:
            lm = load_model(spec, dtype=args.dtype, device=device,
                            revision=args.revision[i] if args.revision else None,
                            step=args.step[i] if args.step else None)
            for corpus in corpora:
                results = evaluate(lm, corpus, protocol, output_path=args.output_path, resume=args.resume,
                                   backend=args.backend, device=torch.device(device),
                                   max_batch_tokens=args.batch_tokens,
                                   checkpoint_every_s=args.checkpoint_every, progress=not args.no_progress,
                                   distributed=world_size > 1)
                all_results.append(results)
                if rank == 0:
                    print(f"wrote {results['path']}", file=sys.stderr)
        except (ModelError, EvalError, ValueError) as exc:
            print(f"rankops eval: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\nrankops eval: interrupted; what was measured is checkpointed: rerun with --resume",
                  file=sys.stderr)
            return 130
    if rank == 0:
        print(markdown_table(all_results))
    return 0


def cmd_fit(args) -> int:
    from rankops.scaling import load_results, markdown, scaling_tables
    try:
        rows = scaling_tables(load_results(args.results))
    except ValueError as exc:
        print(f"rankops fit: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(rows)
    print(text)
    if args.output:
        from rankops.eval.run import write_atomic
        from pathlib import Path
        write_atomic(Path(args.output + ".md"), (text + "\n").encode())
        write_atomic(Path(args.output + ".json"), (json.dumps(rows, indent=2) + "\n").encode())
    return 0


def cmd_plot(args) -> int:
    from rankops.plot import plot_all
    from rankops.scaling import load_results
    try:
        paths = plot_all(load_results(args.results), args.output_dir)
    except ValueError as exc:
        print(f"rankops plot: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def cmd_corpora(args) -> int:
    from rankops.eval.corpora import builtin_corpora
    rows = builtin_corpora()
    print("| name | kind | available | license | install | description |\n|---|---|---|---|---|---|")
    for c in rows:
        print(f"| {c['name']} | {c['kind']} | {'yes' if c['available'] else 'no'} | {c['license']} | "
              f"`{c['install']}` | {c['description']} |")
    return 0


def cmd_lm_eval(argv) -> int:
    try:
        from rankops.integrations.lm_eval import main as lm_eval_main
    except ImportError as exc:
        print(f"rankops lm-eval: error: needs lm-evaluation-harness: pip install 'rankops[lm-eval]' ({exc})",
              file=sys.stderr)
        return 2
    return lm_eval_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        return cmd_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "corpora":
        return cmd_corpora(args)
    if args.command == "fit":
        return cmd_fit(args)
    if args.command == "plot":
        return cmd_plot(args)
    from rankops.__main__ import selfcheck
    return 0 if selfcheck() else 1


if __name__ == "__main__":
    sys.exit(main())
