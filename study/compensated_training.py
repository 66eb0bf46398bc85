"""Training with the compensated loss L = CE + lam * Conf (paper section 6.2), in miniature.

One small Llama (about 0.85M non-embedding parameters) is trained three times on the same KJV
tokens, in the same order, from the same initialisation: with plain cross-entropy
(transformers' own loss), and with rankops' compensated loss for two values of lam (installed
as `model.loss_function`). Every `--eval-every` steps each run is evaluated on held-out KJV
chapters with a RankAccumulator, which gives CE = EE + SA - Conf on text it never saw. The
numbers land in study/compensated/results.json, the figure in study/compensated/components.png
(and .pdf).

    python study/compensated_training.py        # about 5 minutes on 2 CPU cores
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mini_scaling import SEQ, split_kjv, token_stream, train_tokenizer, training_steps  # noqa: E402

from rankops import RankAccumulator  # noqa: E402
from rankops.atomic import write_atomic  # noqa: E402
from rankops.integrations.transformers import CompensatedCausalLMLoss  # noqa: E402

SIZE = (128, 4, 4, 384)   # width, layers, heads, feed-forward width (as in the mini study)
COMPONENTS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")


def heldout_batches(heldout, tokenizer, n_tokens, batch):
    """Disjoint SEQ-token windows of the held-out chapters, n_tokens in all, in fixed batches."""
    stream = token_stream(heldout, tokenizer)[: n_tokens + 1]
    n_windows = (len(stream) - 1) // SEQ
    windows = stream[: n_windows * SEQ + 1]
    x = windows[:-1].view(n_windows, SEQ)
    y = windows[1:].view(n_windows, SEQ)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n_windows, batch)]


@torch.no_grad()
def evaluate(model, batches, vocab_size, device):
    model.eval()
    acc = RankAccumulator(vocab_size)
    for x, y in batches:
        logits = model(input_ids=x.to(device)).logits
        acc.update(logits, y.to(device))
    model.train()
    d = acc.decompose()
    return {name: float(getattr(d, name)) for name in COMPONENTS + ("top1_accuracy",)}


def train_run(lam, stream, tokenizer, eval_batches, args):
    import transformers
    width, layers, heads, ffn = SIZE
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      intermediate_size=ffn, max_position_embeddings=SEQ,
                                      tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(args.device)
    if lam is not None:
        model.loss_function = CompensatedCausalLMLoss(lam, weights=args.weights)
    curve = []
    for step, loss in training_steps(model, stream, args.steps, args.batch, args.lr, args.seed, args.device):
        if step % args.eval_every == 0 or step == args.steps:
            point = {"step": step, "train_loss": loss.item(), **evaluate(model, eval_batches, len(tokenizer), args.device)}
            curve.append(point)
            print(f"  lam={lam} step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "step"),
                  flush=True)
    return curve


def plot(runs, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for run in runs:
        steps = [p["step"] for p in run["curve"]]
        for ax, name in zip(axes, COMPONENTS):
            ax.plot(steps, [p[name] for p in run["curve"]], marker="o", ms=3, label=run["label"])
    for ax, name in zip(axes, COMPONENTS):
        ax.set_title(name.replace("_", " ") + " (held-out KJV, nats)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    for suffix in (".png", ".pdf"):
        fig.savefig(path.with_suffix(suffix), dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lams", type=float, nargs="+", default=[0.2, 0.5],
                   help="values of lam for the compensated runs (a plain-CE run always comes first)")
    p.add_argument("--weights", choices=("batch", "running"), default="batch")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2.25e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(HERE / "work"), help="the tokenizer (not committed)")
    p.add_argument("--out", default=str(HERE / "compensated"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train, heldout = split_kjv()
    tokenizer = train_tokenizer(train.documents, Path(args.work) / "tokenizer")
    stream = token_stream(train, tokenizer)
    eval_batches = heldout_batches(heldout, tokenizer, args.eval_tokens, batch=16)
    runs = []
    for lam in [None] + list(args.lams):
        label = "plain CE" if lam is None else f"CE + {lam} Conf"
        t0 = time.monotonic()
        curve = train_run(lam, stream, tokenizer, eval_batches, args)
        runs.append({"label": label, "lam": 0.0 if lam is None else lam,
                     "loss": "transformers ForCausalLMLoss" if lam is None else "rankops CompensatedCausalLMLoss",
                     "seconds": round(time.monotonic() - t0, 1), "curve": curve})
        # Written after every run, so an interrupted study keeps what it measured.
        record = {"args": vars(args), "model": dict(zip(("width", "layers", "heads", "ffn"), SIZE)),
                  "train_tokens": int(len(stream)), "eval_tokens": sum(int(y.numel()) for _, y in eval_batches),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "runs": runs}
        write_atomic(out / "results.json", (json.dumps(record, indent=2) + "\n").encode())
    plot(runs, out / "components")
    print(markdown(runs))
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


def markdown(runs) -> str:
    lines = ["| run | step | CE | EE | SA | Conf | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        last = run["curve"][-1]
        lines.append(f"| {run['label']} | {last['step']} | {last['cross_entropy']:.4f} | "
                     f"{last['error_entropy']:.4f} | {last['self_alignment']:.4f} | "
                     f"{last['confidence']:.4f} | {last['top1_accuracy']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
