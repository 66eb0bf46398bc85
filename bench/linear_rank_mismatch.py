"""How often the fused output layer's ranks differ from those on the model's own logits, on
real hidden states (issue 14, `rankops eval --fused-head`).

For each model and corpus: the model's decoder runs on the first scored tokens of the corpus
(rankops eval's protocol, disjoint windows), giving the last hidden states exactly as the
output layer receives them (rankops.eval.models.linear_head, whose probe checks that). Then,
batch by batch, the same tokens are scored two ways:
  full    rankops.token_stats(backend="cpu") on lm_head(hidden), the model's own [B, T, V] logits
  fused   rankops.linear_token_stats(backend="cpu") on (hidden, lm_head.weight, lm_head.bias)
and compared token by token: the fraction of tokens whose rank differs, whose tie count
differs, whose pessimistic rank (rank + ties) differs, the largest |rank difference| and the
largest |logp difference|. Per dtype: float32 (the model's), and bfloat16 (hidden states and
weight cast to bf16: the logits of both paths are then bf16, as a bf16 model's would be).

    python bench/linear_rank_mismatch.py --json bench/results/linear_rank_mismatch.jsonl
"""
import argparse
import json
import shlex
import sys
import time

import torch

import rankops
from rankops.eval.corpora import load_corpus
from rankops.eval.models import linear_head, load_model
from rankops.eval.run import batches
from rankops.eval.windows import Protocol, collate, plan_windows

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_token_stats import environment  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compare(hidden, weight, bias, labels, vocab_size):
    """Per-token results of both paths on one batch: hidden [B, T, D], labels [B, T]."""
    logits = torch.nn.functional.linear(hidden, weight, bias)  # [B, T, V], what lm_head computes
    keep = labels != -100
    full = rankops.token_stats(logits[keep][:, :vocab_size], labels[keep], backend="cpu")
    del logits
    fused = rankops.linear_token_stats(hidden[keep], weight, labels[keep], bias=bias, vocab_size=vocab_size,
                                       backend="cpu")
    return full, fused


def measure(lm, corpus, args):
    linear = linear_head(lm)  # refuses a model whose logits are not this linear map
    protocol = Protocol(context_length=args.context_length, max_tokens=args.tokens, batch_size=args.batch_size)
    plan = plan_windows(corpus.documents, lm.tokenizer, protocol, args.context_length)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    per_dtype = {name: {"full": [], "fused": []} for name in args.dtypes}
    seconds = {"forward_s": 0.0}
    with torch.no_grad():
        for _, batch in batches(plan.windows, 0, args.batch_tokens, protocol.batch_size):
            ids, mask, labels = collate(batch, pad)
            t0 = time.perf_counter()
            hidden = linear.hidden_states(ids, mask)  # [B, T, D] float32
            seconds["forward_s"] += time.perf_counter() - t0
            for name in args.dtypes:
                dtype = DTYPES[name]
                bias = None if linear.bias is None else linear.bias.to(dtype)
                t0 = time.perf_counter()
                full, fused = compare(hidden.to(dtype), linear.weight.to(dtype), bias, labels, lm.vocab_size)
                seconds[f"compare_{name}_s"] = seconds.get(f"compare_{name}_s", 0.0) + time.perf_counter() - t0
                per_dtype[name]["full"].append(full)
                per_dtype[name]["fused"].append(fused)
    rows = []
    for name, got in per_dtype.items():
        full = {k: torch.cat([getattr(s, k) for s in got["full"]]) for k in ("rank", "ties", "logp")}
        fused = {k: torch.cat([getattr(s, k) for s in got["fused"]]) for k in ("rank", "ties", "logp")}
        n = full["rank"].numel()
        rank_diff = (full["rank"] != fused["rank"])
        rows.append({
            "model": lm.name, "corpus": corpus.name, "dtype": name, "n_tokens": n,
            "context_length": args.context_length, "hidden_size": int(linear.weight.shape[1]),
            "vocab_size": lm.vocab_size, "output_layer_rows": int(linear.weight.shape[0]),
            "bias": linear.bias is not None,
            "rank_mismatch_rate": rank_diff.double().mean().item(),
            "n_rank_mismatch": int(rank_diff.sum()),
            "ties_mismatch_rate": (full["ties"] != fused["ties"]).double().mean().item(),
            "pessimistic_rank_mismatch_rate": ((full["rank"] + full["ties"]) != (fused["rank"] + fused["ties"]))
            .double().mean().item(),
            "max_abs_rank_diff": int((full["rank"] - fused["rank"]).abs().max()),
            "logp_max_abs_diff": (full["logp"].double() - fused["logp"].double()).abs().max().item(),
            "tie_rate_full": (full["ties"] > 0).double().mean().item(),
            "top1_full": (full["rank"] == 0).double().mean().item(),
            **{k: round(v, 2) for k, v in seconds.items()},
        })
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3-270m")
    p.add_argument("--corpora", default="austen,kjv")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=2048, help="scored tokens per model and corpus")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--json", metavar="PATH", help="append the rows to this jsonl file")
    args = p.parse_args()
    args.dtypes = args.dtypes.split(",")
    env = dict(environment("cpu"), device="cpu", command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    import transformers
    env["transformers"] = transformers.__version__
    corpora = [load_corpus(c) for c in args.corpora.split(",")]
    for spec in args.models.split(","):
        lm = load_model(spec, dtype="float32", device="cpu")
        for corpus in corpora:
            for row in measure(lm, corpus, args):
                row = {**env, "bench": "linear_rank_mismatch", **row}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
