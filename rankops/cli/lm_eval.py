"""`rankops lm-eval`: lm-evaluation-harness's `run` with the hf-rankops model
(rankops.integrations.lm_eval), the rankops tasks on the include path, and the decomposition
printed as a table after lm-eval's."""
import argparse
import inspect
import sys


def add_parser(sub) -> None:
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with the hf-rankops model: `rankops lm-eval [--corpus PATH] "
                        "LM-EVAL-RUN-ARGS` (see `rankops lm-eval --help`)")


def run(args) -> int:  # reached only through main(), which hands lm-eval its own arguments
    return main([])


def markdown_table(results: dict) -> str:
    """The rankops decomposition of each rolling task beside lm-eval's perplexities."""
    head = ("| task | tokens | CE | EE | SA | Conf | EE/CE | EE magnitude share | P(0) | MRR | word ppl | byte ppl | "
            "bits/byte |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for task, r in results["config"]["rankops"]["tasks"].items():
        d, m = r["decomposition"], results.get("results", {}).get(task, {})

        def metric(name):
            v = m.get(f"{name},none")
            return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
        rows.append(f"| {task} | {r['n_tokens']} | {d['cross_entropy']:.4f} | {d['error_entropy']:.4f} | "
                    f"{d['self_alignment']:.4f} | {d['confidence']:.4f} | {d['error_entropy_share']:.3f} | "
                    f"{d['magnitude_shares']['error_entropy']:.3f} | {d['top1_accuracy']:.3f} | "
                    f"{d['mean_reciprocal_rank']:.3f} | {metric('word_perplexity')} | "
                    f"{metric('byte_perplexity')} | {metric('bits_per_byte')} |")
    return "\n".join([head] + rows)
def main(argv=None) -> int:
    """`rankops lm-eval [--corpus PATH ...] LM-EVAL-RUN-ARGS`: lm-eval's `run` command with the
    model forced to hf-rankops and the rankops tasks on the include path; each --corpus adds a
    task for that corpus (local_task). Prints the decomposition table after lm-eval's."""
    try:
        import lm_eval
        from lm_eval._cli.harness import HarnessCLI

        from rankops.integrations.lm_eval import TASKS_DIR, local_task
    except ImportError as exc:
        print(f"rankops lm-eval: error: needs lm-evaluation-harness: pip install 'rankops[lm-eval]' ({exc})",
              file=sys.stderr)
        return 2
    from rankops.eval.corpora import CorpusError
    pre = argparse.ArgumentParser(prog="rankops lm-eval", add_help=False, allow_abbrev=False)
    pre.add_argument("--corpus", action="append", default=[])
    pre.add_argument("--text-field", default="text")
    pre.add_argument("--n-documents", type=int, default=None)
    pre.add_argument("--corpus-seed", type=int, default=42)
    own, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["run"]:
        rest = rest[1:]
    if "-h" in rest or "--help" in rest:
        print(inspect.cleandoc(main.__doc__) + "\n\nrankops options (the rest are lm-eval run's, below):\n"
              "  --corpus PATH       a corpus (as for rankops eval) scored as a task of its own; repeatable\n"
              "  --text-field NAME   text field of jsonl/parquet/datasets corpora (default: text)\n"
              "  --n-documents N     score N documents shuffled with --corpus-seed, as rankops eval selects\n"
              "                      them (default: every document, in order)\n"
              "  --corpus-seed S     (default: 42)\n")
    saved_argv = sys.argv
    sys.argv = ["lm-eval", "run", *rest]
    try:
        args = HarnessCLI().parse_args()
    finally:
        sys.argv = saved_argv
    if args.model not in (None, "hf-rankops"):
        print(f"rankops lm-eval: error: the model is always hf-rankops (lm-eval's hf with the "
              f"decomposition); got --model {args.model}", file=sys.stderr)
        return 2
    if getattr(args, "use_cache", None):
        print("rankops lm-eval: error: --use_cache replays cached answers without logits, so their tokens "
              "could not be decomposed", file=sys.stderr)
        return 2
    args.model = "hf-rankops"
    include = [args.include_path] if args.include_path else []
    include.append(str(TASKS_DIR))
    try:
        for corpus in own.corpus:
            path, name = local_task(corpus, text_field=own.text_field, n_documents=own.n_documents,
                                    seed=own.corpus_seed)
            include.append(path)
            args.tasks = (args.tasks or []) + [name]
    except CorpusError as exc:
        print(f"rankops lm-eval: error: {exc}", file=sys.stderr)
        return 2
    args.include_path = include

    captured = {}
    original = lm_eval.simple_evaluate

    def simple_evaluate(*a, **kw):
        captured["results"] = results = original(*a, **kw)
        return results
    lm_eval.simple_evaluate = simple_evaluate  # lm-eval's run command imports it when it runs
    try:
        HarnessCLI().execute(args)
    except (ValueError, OSError) as exc:
        print(f"rankops lm-eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        lm_eval.simple_evaluate = original
    results = captured.get("results")
    if results is not None and "rankops" in results.get("config", {}):
        print("\nrankops: cross-entropy decomposition of the rolling log-likelihood tasks (nats per token)")
        print(markdown_table(results))
    elif results is not None:
        print("\nrankops: no rolling log-likelihood task ran, so there is no decomposition", file=sys.stderr)
    return 0
