"""`rankops eval`: decompose models' cross-entropy on corpora (rankops.eval.run.evaluate).

Under torchrun (WORLD_SIZE > 1 in the environment) each process evaluates its share of the
batches; process 0 writes the results and prints the table.
"""
import argparse
import contextlib
import sys

DEFAULT_MAX_TOKENS = 20000


def _max_tokens(value: str):
    if value in ("all", "0"):
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'all'")
    return n


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="decompose a model's cross-entropy on corpora",
                       description="Runs each model on each corpus and writes OUTPUT/<model>/<corpus>/"
                       "results.json with the decomposition; prints a markdown table.")
    from rankops.eval.models import BUILTIN_MODELS
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
    e.add_argument("--text-field", default="text", help="text field of jsonl/parquet/datasets corpora")
    e.add_argument("--split", default="train", help="split of a datasets corpus")
    e.add_argument("--output-path", default="rankops_results", help="results folder (default: %(default)s)")
    e.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    e.add_argument("--backend", default="auto", help="rankops kernel backend (default: fastest available)")
    e.add_argument("--fused-head", default="auto", choices=["auto", "on", "off"],
                   help="score the output layer from the last hidden states block by block, never holding "
                        "a window's logits (on: refuse a model whose logits are not a plain linear map of "
                        "them; off: the model's logits; auto, the default: fused where possible)")
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


def _error(message: str) -> int:
    print(f"rankops eval: error: {message}", file=sys.stderr)
    return 2


def run(args, *, on_checkpoint=None) -> int:
    """The command on parsed arguments; on_checkpoint goes to every evaluate() call (see there)."""
    import torch

    from rankops.eval.world import EvalProcessGroup

    for name, values in (("--step", args.step), ("--revision", args.revision)):
        if values is not None and len(values) != len(args.model):
            return _error(f"{name} was given {len(values)} times for {len(args.model)} models")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return _error(f"--device {device} is not usable here: {exc}")
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
    try:
        protocol = Protocol(n_documents=args.n_documents, seed=args.seed, context_length=args.context_length,
                            stride=args.stride, add_bos=not args.no_bos, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, lm_eval_windows=args.lm_eval_windows)
        corpora = [load_corpus(c, text_field=args.text_field, split=args.split) for c in args.corpus]
    except (ValueError, CorpusError) as exc:
        return _error(str(exc))
    all_results = []
    for i, spec in enumerate(args.model):
        try:
            lm = load_model(spec, dtype=args.dtype, device=processes.device,
                            revision=args.revision[i] if args.revision else None,
                            step=args.step[i] if args.step else None)
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
