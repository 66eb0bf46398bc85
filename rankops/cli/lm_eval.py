"""`rankops lm-eval`: lm-evaluation-harness's `run` with the hf-rankops model
(rankops.integrations.lm_eval), the rankops tasks on the include path, and the decomposition
printed as a table after lm-eval's.

Only lm-eval's public interfaces are used here: its command line runs as it would from a shell
(`lm_eval.__main__.cli_evaluate`, the `lm-eval` console script) in a child process that first
imports the adapter, which registers hf-rankops (`lm_eval.api.registry.register_model`); the
decomposition comes back in lm-eval's own results file (`config.rankops`, written there by the
model's `get_model_info`). lm-eval's command line takes one --include_path, so the rankops tasks,
the --corpus tasks and the user's own include folder (copied) are gathered in one folder for
the run. Without --output_path the results file goes to a temporary folder, removed afterwards.
"""
import argparse
import inspect
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def add_parser(sub) -> None:
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with the hf-rankops model: `rankops lm-eval [--corpus PATH] "
                        "LM-EVAL-RUN-ARGS` (see `rankops lm-eval --help`)")


def run(args) -> int:  # reached only through main(), which hands lm-eval its own arguments
    return main([])


def markdown_table(results: dict) -> str:
    """The rankops decomposition of each rolling task beside lm-eval's perplexities."""
    from rankops.eval.run import cell
    head = ("| task | tokens | CE | EE | SA | Conf | EE/CE | EE magnitude share | P(0) | MRR | word ppl | byte ppl | "
            "bits/byte |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for task, r in results["config"]["rankops"]["tasks"].items():
        d, m = r["decomposition"], results.get("results", {}).get(task, {})

        def metric(name):
            v = m.get(f"{name},none")
            return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
        rows.append(f"| {task} | {r['n_tokens']} | {d['cross_entropy']:.4f} | {d['error_entropy']:.4f} | "
                    f"{d['self_alignment']:.4f} | {d['confidence']:.4f} | {cell(d['error_entropy_share'], 3)} | "
                    f"{cell(d['magnitude_shares']['error_entropy'], 3)} | {d['top1_accuracy']:.3f} | "
                    f"{d['mean_reciprocal_rank']:.3f} | {metric('word_perplexity')} | "
                    f"{metric('byte_perplexity')} | {metric('bits_per_byte')} |")
    return "\n".join([head] + rows)
def _error(message: str) -> int:
    print(f"rankops lm-eval: error: {message}", file=sys.stderr)
    return 2


def _own_options(argv):
    """(rankops' options, lm-eval's options as given, the few of lm-eval's this command reads)."""
    own = argparse.ArgumentParser(prog="rankops lm-eval", add_help=False, allow_abbrev=False)
    own.add_argument("--corpus", action="append", default=[])
    own.add_argument("--text-field", default="text")
    own.add_argument("--n-documents", type=int, default=None)
    own.add_argument("--corpus-seed", type=int, default=42)
    options, rest = own.parse_known_args(argv)
    if rest[:1] == ["run"]:
        rest = rest[1:]
    # The same option names (and abbreviations) as lm-eval's run command.
    theirs = argparse.ArgumentParser(add_help=False)
    theirs.add_argument("--model", "-M")
    theirs.add_argument("--use_cache", "-c")
    theirs.add_argument("--include_path")
    theirs.add_argument("--output_path", "-o")
    theirs.add_argument("--tasks", "-t", nargs="+")
    read, _ = theirs.parse_known_args(rest)
    return options, rest, read


def main(argv=None) -> int:
    """`rankops lm-eval [--corpus PATH ...] LM-EVAL-RUN-ARGS`: lm-eval's `run` command with the
    model forced to hf-rankops and the rankops tasks on the include path; each --corpus adds a
    task for that corpus (local_task). Prints the decomposition table after lm-eval's."""
    options, rest, read = _own_options(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print(inspect.cleandoc(main.__doc__) + "\n\nrankops options (the rest are lm-eval run's, below):\n"
              "  --corpus PATH       a corpus (as for rankops eval) scored as a task of its own; repeatable\n"
              "  --text-field NAME   text field of jsonl/parquet/datasets corpora (default: text)\n"
              "  --n-documents N     score N documents shuffled with --corpus-seed, as rankops eval selects\n"
              "                      them (default: every document, in order)\n"
              "  --corpus-seed S     (default: 42)\n", flush=True)
        return _run_harness(["--help"])
    if read.model not in (None, "hf-rankops"):
        return _error(f"the model is always hf-rankops (lm-eval's hf with the decomposition); got --model {read.model}")
    if read.use_cache:
        return _error("--use_cache replays cached answers without logits, so their tokens could not be decomposed")
    try:
        from rankops.integrations.lm_eval import TASKS_DIR, local_task
    except ImportError as exc:
        return _error(f"needs lm-evaluation-harness: pip install 'rankops[lm-eval]' ({exc})")
    from rankops.eval.corpora import CorpusError

    with tempfile.TemporaryDirectory(prefix="rankops-lm-eval-") as tmp:
        include = Path(tmp) / "tasks"
        shutil.copytree(TASKS_DIR, include)
        if read.include_path:
            shutil.copytree(read.include_path, include / "user", symlinks=True)
        tasks = []
        try:
            for corpus in options.corpus:
                path, name = local_task(corpus, text_field=options.text_field, n_documents=options.n_documents,
                                        seed=options.corpus_seed)
                shutil.copy(Path(path) / f"{name}.yaml", include / f"{name}.yaml")
                tasks.append(name)
        except CorpusError as exc:
            return _error(str(exc))
        output_path = read.output_path or str(Path(tmp) / "results")
        # argparse keeps the last of a repeated option: these override what rest says.
        args = [*rest, "--model", "hf-rankops", "--include_path", str(include), "--output_path", output_path]
        if tasks:
            args += ["--tasks", *(read.tasks or []), *tasks]
        started = time.time()
        status = _run_harness(args)
        if status != 0:
            return status
        results = _results_file(Path(output_path), started)
        if results is None:
            print("\nrankops: lm-eval wrote no results file, so there is no decomposition to show", file=sys.stderr)
            return 0
        import json
        results = json.loads(results.read_text())
    if "rankops" in results.get("config", {}):
        print("\nrankops: cross-entropy decomposition of the rolling log-likelihood tasks (nats per token)")
        print(markdown_table(results))
    else:
        print("\nrankops: no rolling log-likelihood task ran, so there is no decomposition", file=sys.stderr)
    return 0


def _run_harness(args) -> int:
    """lm-eval's own command line, `lm-eval run ARGS`, in a child process that knows hf-rankops."""
    sys.stdout.flush()
    code = "from rankops.cli.lm_eval import harness_main; harness_main()"
    return subprocess.run([sys.executable, "-c", code, "run", *args]).returncode


def harness_main() -> None:
    """The child process: lm-eval's console entry point on this process's arguments, with the
    hf-rankops model registered; lm-eval's errors on bad arguments or files exit with status 2."""
    import rankops.integrations.lm_eval  # noqa: F401  (registers hf-rankops)
    from lm_eval.__main__ import cli_evaluate
    try:
        cli_evaluate()
    except (ValueError, OSError) as exc:
        print(f"rankops lm-eval: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)


def _results_file(output_path: Path, since: float) -> Optional[Path]:
    """The results file lm-eval wrote under output_path (as EvaluationTracker names it) since `since`."""
    if output_path.suffix == ".json":
        candidates = output_path.parent.glob(f"{output_path.stem}_*.json")
    else:
        candidates = output_path.glob("*/results_*.json")
    fresh = [p for p in candidates if p.stat().st_mtime >= since - 1]
    return max(fresh, key=lambda p: p.stat().st_mtime, default=None)
