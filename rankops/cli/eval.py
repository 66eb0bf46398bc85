"""`rankops eval`: decompose models' cross-entropy on corpora (rankops.eval.run.evaluate).

Under torchrun (WORLD_SIZE > 1 in the environment) each process evaluates its share of the
batches; process 0 writes the results and prints the table.
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

DEFAULT_MAX_TOKENS = 20000
_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def _max_tokens(value: str):
    """--max-tokens: a positive count, with an optional k/M/G suffix (20k, 1.5M), or 'all'."""
    text = value.strip().lower().replace("_", "")
    if text == "all":
        return None
    scale = _SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        n = float(number) * scale if scale > 1 else int(number)
    except ValueError:
        n = None
    if n is None or n != int(n) or n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens (20000, 20k, 1.5M) or "
                                         f"'all', got {value!r}")
    return int(n)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="decompose a model's cross-entropy on corpora", formatter_class=_HelpFormatter,
                       description="Runs each model on each corpus and writes OUTPUT/<model>/<corpus>/"
                       "results.json with the decomposition; prints a markdown table. Everything that "
                       "can be checked before a model loads is checked first.")
    from rankops.eval.models import BUILTIN_MODELS, DTYPES
    from rankops.ops.common import BACKENDS
    e.add_argument("--model", action="append", required=True, metavar="MODEL",
                   help="a transformers folder, a .gguf file, a built-in ("
                        + ", ".join(f"'{m.name}': {m.description}" for m in BUILTIN_MODELS.values())
                        + "), or a hub id; repeat for several models or checkpoints")
    e.add_argument("--step", action="append", type=int, metavar="N",
                   help="training step of each --model, in order (default: read from names like "
                        "checkpoint-1000)")
    e.add_argument("--revision", action="append", metavar="REV",
                   help="hub revision of each --model, in order (hub models only)")
    e.add_argument("--corpus", action="append", required=True, metavar="CORPUS",
                   help="a built-in corpus (see `rankops corpora`), a text file or folder, .jsonl, "
                        ".parquet, a datasets folder, or a hub dataset id; repeatable")
    e.add_argument("--text-field", default="text", metavar="NAME", help="text field of jsonl/parquet/datasets corpora")
    e.add_argument("--split", default="train", metavar="NAME", help="split of a datasets corpus")
    e.add_argument("--output-path", default="rankops_results", metavar="DIR", help="results folder")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    e.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="the model's weights and logits; the statistics are accumulated in float64 "
                        "or exact fixed point whatever this is")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: cuda if present, else cpu")
    e.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="rankops kernel backend; auto: the fastest available for the device and dtype "
                        "(`rankops --version` lists those built)")
    e.add_argument("--fused-head", default="auto", choices=["auto", "on", "off"],
                   help="score the output layer from the last hidden states block by block, never holding "
                        "a window's logits (on: refuse a model whose logits are not a plain linear map of "
                        "them; off: the model's logits; auto: fused where possible)")
    e.add_argument("--n-documents", type=_positive_int, default=1000, metavar="N", help="documents after shuffling")
    e.add_argument("--seed", type=int, default=42, help="document shuffle seed")
    e.add_argument("--context-length", type=_positive_int, default=None, metavar="TOKENS",
                   help="window length (default: the model's)")
    e.add_argument("--stride", type=_positive_int, default=None, metavar="TOKENS",
                   help="sliding windows with this stride, shorter than the context length (default: windows overlapping by one token, "
                        "each scoring all its tokens but the first)")
    e.add_argument("--no-bos", action="store_true", help="do not prepend BOS to documents")
    e.add_argument("--lm-eval-windows", action="store_true",
                   help="lm-evaluation-harness's rolling windows (what `rankops lm-eval` scores) instead")
    e.add_argument("--max-tokens", type=_max_tokens, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="scored-token budget per model and corpus: a count (20000, 20k, 1.5M) or 'all' "
                        "(every selected document); the default keeps a CPU run to a few minutes")
    e.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="windows per batch at most")
    e.add_argument("--batch-tokens", type=_positive_int, default=8192, metavar="N", help="padded tokens per batch at most")
    e.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="checkpoint interval in seconds")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar or stage messages on stderr (the table and errors still print)")


def _error(message: str) -> int:
    print(f"rankops eval: error: {message}", file=sys.stderr)
    return 2


def _say(args, message: str) -> None:
    if not args.no_progress:
        print(f"rankops eval: {message}", file=sys.stderr, flush=True)


def _output_problem(output_path: str):
    """Why results cannot be written under output_path, or None; creates nothing."""
    path = Path(output_path).expanduser().absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"cannot write results to --output-path {output_path}: {parent} is a file, not a folder"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot write results to --output-path {output_path}: {parent} is not writable"
            return None
    return None


def _preflight(args, device: str):
    """Every check that needs no model, before any model loads (minutes): the optional modules,
    the models' specs, the backend for this device and dtype, the output folder. An error
    message, or None."""
    from rankops.cli.extras import first_missing
    missing = first_missing("transformers", *(() if args.no_progress else ("tqdm",)))
    if missing:
        return missing
    import torch

    from rankops.eval.models import DTYPES, ModelError, check_model_spec
    from rankops.ops.common import resolve_backend
    for name, values in (("--step", args.step), ("--revision", args.revision)):
        if values is not None and len(values) != len(args.model):
            return f"{name} was given {len(values)} times for {len(args.model)} models"
    for spec in args.model:
        try:
            check_model_spec(spec)
        except ModelError as exc:
            return str(exc)
    try:
        resolve_backend(args.backend, torch.empty(0, dtype=DTYPES[args.dtype], device=device))
    except (TypeError, ValueError) as exc:
        return f"--backend {args.backend}: {exc}"
    if args.stride is not None and args.lm_eval_windows:
        return "--stride does not apply to --lm-eval-windows (lm-eval's rolling windows are disjoint)"
    if args.context_length is not None and args.context_length < 2:
        return f"--context-length must be at least 2, got {args.context_length}"
    if args.stride is not None and args.context_length is not None and args.stride >= args.context_length:
        return (f"--stride {args.stride} must be shorter than --context-length {args.context_length} "
                "(a window of C tokens predicts C - 1 labels)")
    return _output_problem(args.output_path)


def run(args, *, on_checkpoint=None) -> int:
    """The command on parsed arguments; on_checkpoint goes to every evaluate() call (see there)."""
    import torch

    from rankops.eval.world import EvalProcessGroup

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return _error(f"--device {device} is not usable here: {exc}")
    problem = _preflight(args, device)
    if problem is not None:
        return _error(problem)
    with contextlib.ExitStack() as stack:
        try:
            processes = stack.enter_context(EvalProcessGroup(device))
        except (RuntimeError, ValueError) as exc:
            return _error(f"cannot start the distributed run: {exc}")
        return _evaluate_all(args, processes, on_checkpoint)


def _evaluate_all(args, processes, on_checkpoint) -> int:
    from rankops.eval.corpora import CorpusError, load_corpus
    from rankops.eval.models import ModelError, load_model
    from rankops.eval.run import EvalError, evaluate, markdown_table
    from rankops.eval.windows import Protocol

    rank, distributed = processes.world.rank, processes.world.size > 1
    if args.no_progress:  # transformers' own bars too ("Loading weights", "Writing model shards")
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        protocol = Protocol(n_documents=args.n_documents, seed=args.seed, context_length=args.context_length,
                            stride=args.stride, add_bos=not args.no_bos, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, lm_eval_windows=args.lm_eval_windows)
        corpora = []
        for c in args.corpus:
            if rank == 0:
                _say(args, f"reading corpus {c}")
            corpora.append(load_corpus(c, text_field=args.text_field, split=args.split))
    except (ValueError, CorpusError) as exc:
        return _error(str(exc))
    all_results = []
    for i, spec in enumerate(args.model):
        try:
            started = time.monotonic()
            if rank == 0:
                _say(args, f"loading model {spec} on {processes.device} ({args.dtype})")
            lm = load_model(spec, dtype=args.dtype, device=processes.device,
                            revision=args.revision[i] if args.revision else None,
                            step=args.step[i] if args.step else None)
            if rank == 0:
                _say(args, f"model {lm.name} loaded in {time.monotonic() - started:.0f} s")
            for corpus in corpora:
                results = evaluate(lm, corpus, protocol, output_path=args.output_path, resume=args.resume,
                                   backend=args.backend, device=processes.device,
                                   max_batch_tokens=args.batch_tokens, checkpoint_every_s=args.checkpoint_every,
                                   progress=not args.no_progress, distributed=distributed,
                                   on_checkpoint=on_checkpoint, fused_head=args.fused_head)
                all_results.append(results)
                if rank == 0:
                    print(f"wrote {results['path']}", file=sys.stderr)
        except (ModelError, EvalError, ValueError) as exc:
            return _error(str(exc))
        except KeyboardInterrupt:
            print("\nrankops eval: interrupted; what was measured is checkpointed: rerun with --resume",
                  file=sys.stderr)
            return 130
    if rank == 0:
        print(markdown_table(all_results))
    return 0
