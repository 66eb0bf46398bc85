"""Overhead of the rankops metric over a plain forward pass of the same model and batches.

For each batch: the model's forward pass, then RankAccumulator.update on its logits with the
fused kernel, then the same with the pure-torch reference backend (a named baseline); the three
are timed back to back on every batch, and the sums compared. The accumulators of the two
backends are checked to agree (counts exactly) before anything is reported.

    python bench/bench_eval_overhead.py                           # SmolLM2 on Austen, CPU
    python bench/bench_eval_overhead.py --device cuda --dtype bfloat16 --json bench/results/eval_overhead_cuda.jsonl
"""
import argparse
import json
import sys
import time

import torch

import rankops
from rankops.eval.corpora import load_corpus
from rankops.eval.models import load_model
from rankops.eval.run import batches
from rankops.bench import environment
from rankops.eval.windows import Protocol, collate, plan_windows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--corpus", default="austen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=8000)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    device = torch.device(args.device)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    corpus = load_corpus(args.corpus)
    protocol = Protocol(context_length=args.context_length, max_tokens=args.max_tokens)
    plan = plan_windows(corpus.documents, lm.tokenizer, protocol, args.context_length)
    fast, ref = rankops.RankAccumulator(lm.vocab_size, device=device), rankops.RankAccumulator(lm.vocab_size, device=device)
    forward_s = fast_s = ref_s = 0.0
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for _, batch in batches(plan.windows, 0, args.batch_tokens, protocol.batch_size):
            ids, mask, labels = (t.to(device) for t in collate(batch, pad))
            sync(device); t0 = time.perf_counter()
            logits = lm.logits(ids, mask)
            sync(device); t1 = time.perf_counter()
            fast.update(logits, labels)
            sync(device); t2 = time.perf_counter()
            ref.update(logits, labels, backend="torch")
            sync(device); t3 = time.perf_counter()
            forward_s, fast_s, ref_s = forward_s + t1 - t0, fast_s + t2 - t1, ref_s + t3 - t2
    if not torch.equal(fast.count, ref.count):
        sys.exit("FAIL: the fused kernel's rank counts differ from the reference's")
    row = dict(environment(device.type), op="eval_overhead", model=lm.name, corpus=corpus.name,
               device=device.type, dtype=args.dtype, n_tokens=fast.n_tokens, context_length=args.context_length,
               forward_s=round(forward_s, 4), metric_s=round(fast_s, 4), reference_metric_s=round(ref_s, 4),
               overhead=round(fast_s / forward_s, 5), reference_overhead=round(ref_s / forward_s, 5))
    print(f"{lm.name} on {corpus.name}, {fast.n_tokens} tokens, {device.type} {args.dtype}: forward "
          f"{forward_s:.2f} s; rankops metric {fast_s:.3f} s = {100 * row['overhead']:.2f}% of the forward; "
          f"reference backend {ref_s:.2f} s = {100 * row['reference_overhead']:.1f}%")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
