"""A miniature reproduction of the paper's study, on a 2-core CPU in well under an hour.

A ladder of Llama-family causal LMs (about 55 thousand to 4 million non-embedding parameters)
is trained on the same tokens of the King James Bible (Debian's bible-kjv), with a BPE tokenizer
trained here on the training chapters. Every model is checkpointed along training; every
checkpoint is evaluated with rankops on held-out KJV chapters and on Jane Austen's novels
(Debian's r-cran-janeaustenr); then `rankops fit` and `rankops plot` make the tables and
figures. Everything is seeded; the results, tables and figures land in study/.

    python study/mini_scaling.py            # about 8 minutes on 2 CPU cores (--device cuda on a GPU)
"""
import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from rankops.atomic import write_atomic
from rankops.eval.corpora import Corpus, load_corpus
from rankops.eval.models import load_model
from rankops.eval.run import evaluate
from rankops.eval.windows import Protocol
from rankops.plot import plot_all
from rankops.scaling import load_results, markdown, scaling_tables

HERE = Path(__file__).resolve().parent
# (width, layers, heads, feed-forward width): about 55k, 160k, 440k, 850k, 1.6M, 2.2M, 4.0M
# non-embedding parameters.
LADDER = [(48, 2, 2, 128), (64, 3, 2, 192), (96, 4, 3, 256), (128, 4, 4, 384), (160, 5, 5, 448),
          (192, 5, 6, 512), (256, 5, 8, 704)]
VOCAB = 4096
SEQ = 128


def split_kjv(seed=0, held_out=0.05):
    kjv = load_corpus("kjv")
    docs = list(kjv.documents)
    random.Random(seed).shuffle(docs)
    n_test = int(len(docs) * held_out)
    train = Corpus("kjv-train", tuple(docs[n_test:]), kjv.source, kjv.kind, kjv.license)
    test = Corpus("kjv-heldout", tuple(docs[:n_test]), kjv.source, kjv.kind, kjv.license)
    return train, test


def train_tokenizer(documents, path: Path, vocab_size: int = VOCAB):
    """A byte-level BPE of vocab_size words (with <s> and </s>) trained on documents, in their
    order; saved to path as a transformers tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>")
    fast.save_pretrained(path)
    return fast


def token_stream(train: Corpus, tokenizer) -> torch.Tensor:
    ids = []
    for doc in train.documents:
        ids += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def training_steps(model, stream, steps, batch, lr, seed, device):
    """Trains model on random SEQ-token windows of stream, yielding (step, loss) after each
    optimiser step: AdamW, a 5% linear warm-up then cosine decay, gradients clipped at 1. The
    batches depend on the seed alone, so runs that share a seed see the same tokens in order."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(stream) - SEQ - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + SEQ] for s in starts]).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        yield step, loss.detach()


def train_model(size, stream, tokenizer, steps, batch, checkpoints, out: Path, seed=0, device="cpu"):
    import transformers
    width, layers, heads, ffn = size
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      intermediate_size=ffn, max_position_embeddings=SEQ,
                                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device)
    # A smaller step size for wider models (as muP prescribes for hidden weights), so the larger
    # models of this short schedule are not the worst trained.
    lr = min(3e-3, 3e-3 * 96 / width)
    for step, loss in training_steps(model, stream, steps, batch, lr, seed, device):
        if step in checkpoints:
            path = out / f"checkpoint-{step}"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            print(f"  {out.name} step {step}: train loss {loss.item():.3f}", flush=True)
    return [out / f"checkpoint-{s}" for s in sorted(checkpoints)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=20000)
    p.add_argument("--work", default=str(HERE / "work"), help="models (not committed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work, results_dir = Path(args.work), HERE / "results"
    if results_dir.exists():
        shutil.rmtree(results_dir)
    started = time.monotonic()
    train, heldout = split_kjv()
    austen = load_corpus("austen")
    tokenizer = train_tokenizer(train.documents, work / "tokenizer")
    stream = token_stream(train, tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens; training stream {len(stream)} tokens; each model sees "
          f"{args.steps * args.batch * SEQ} tokens", flush=True)
    checkpoints = {args.steps // 6, args.steps // 2, args.steps}
    protocol = Protocol(context_length=SEQ, max_tokens=args.eval_tokens, batch_size=16)
    for size in LADDER:
        name = f"llama-d{size[0]}-l{size[1]}"
        t0 = time.monotonic()
        paths = train_model(size, stream, tokenizer, args.steps, args.batch, checkpoints, work / name,
                            device=args.device)
        for path in paths:
            lm = load_model(str(path), device=args.device)
            for corpus in (heldout, austen):
                lm.name = f"{name}-step{lm.step}"
                evaluate(lm, corpus, protocol, output_path=str(results_dir), progress=False)
        n = lm.n_parameters["non_embedding"]
        print(f"{name}: {n} non-embedding parameters, trained and evaluated in "
              f"{time.monotonic() - t0:.0f} s", flush=True)
    results = load_results([str(results_dir)])
    rows = scaling_tables(results)
    text = markdown(rows)
    write_atomic(HERE / "tables.md", (text + "\n").encode())
    write_atomic(HERE / "tables.json", (json.dumps(rows, indent=2) + "\n").encode())
    plot_all(results, str(HERE / "figures"))
    print(text)
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
