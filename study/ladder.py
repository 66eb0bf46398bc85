"""Does only Error-Entropy scale? A compute-matched ladder, with intervals, on 2 CPU cores.

Six Llama-family sizes from about 14 thousand to 440 thousand non-embedding parameters (1.5
decades), each trained from scratch on 20 tokens per non-embedding parameter (Chinchilla's
ratio), three seeds per size, all with one byte-level BPE tokenizer of 1024 words trained here on
the training split. The text is real and comes from five Debian packages: Jane Austen's novels
(prose), the King James Bible (scripture), the CPython standard library (code), the GNU
Collaborative International Dictionary of English (dictionary) and the Jargon File (training
only). A tenth of each evaluated corpus's documents is held out and never trained on.

Every final model, and the training checkpoints of two sizes, are evaluated with rankops
(`rankops.eval.evaluate`, as `rankops eval` runs it) on the held-out documents of each corpus;
each held-out document is also scored on its own, so the intervals can resample documents.
`rankops fit` makes the paper's R^2 and scaling-difference tables, the bootstrap here resamples
seeds and documents together, `rankops.fit.fit_saturating` gives the saturating fits and
`rankops plot` the paper's figures. SmolLM2-135M and Gemma-3-270M (another family, another
tokenizer: their nats per token are not comparable with the ladder's) are evaluated on the
same held-out documents beside it.

    python study/ladder.py                    # about an hour on 2 CPU cores
    python study/ladder.py --device cuda      # on a GPU; --scale 4 for a ladder 4x larger

Writes study/ladder/: results/ (rankops eval results of the ladder), pretrained/ (of the two
pretrained models), run.json (the setup and each model's training), doc_states.npz (each
held-out document's per-rank counts and logp sums, per model), summary.json, tables.md,
figures/. The trained models go to --work (not committed). `--analyse-only` recomputes
everything after the models from those files (under a minute on 2 cores).
"""
import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rankops import RankAccumulator, decompose_counts
from rankops.atomic import write_atomic
from rankops.eval.corpora import Corpus, load_corpus
from rankops.eval.corpora.debian import fetch_packages, package_root
from rankops.eval.models import load_model
from rankops.eval.run import batches, evaluate
from rankops.eval.windows import Protocol, collate, plan_windows
from rankops.fit import fit_saturating
from rankops.plot import plot_all
from rankops.scaling import (COMPONENTS, component_fits, final_points, load_results, markdown, models_markdown,
                             model_rows, scaling_tables)

from mini_scaling import SEQ, train_tokenizer, training_steps  # study/, beside this script

HERE = Path(__file__).resolve().parent
OUT = HERE / "ladder"

# (width, layers, heads, feed-forward width): 13.9k, 26.8k, 56.9k, 115k, 222k and 443k
# non-embedding parameters, each about twice the one before.
LADDER = [(24, 2, 2, 64), (32, 2, 2, 96), (40, 3, 2, 104), (56, 3, 4, 152), (72, 4, 4, 160),
          (96, 4, 4, 256)]
CHECKPOINTED = (3, 5)     # sizes whose training checkpoints are evaluated too (seed 0)
SEEDS = (0, 1, 2)
VOCAB = 1024              # SEQ, the window length, is mini_scaling's: 128 tokens
BATCH = 16                # sequences per step: 2048 tokens
TOKENS_PER_PARAM = 20
HELD_OUT = 0.1            # of each evaluated corpus's documents
HELD_OUT_CHARS = 250_000  # at most this much held-out text per corpus is evaluated
GCIDE_CHARS = 12_000_000  # of the dictionary's 40 MB, so it does not swamp the other corpora
PRETRAINED = ("smollm2", "gemma3-270m")
PRETRAINED_TOKENS = 10_000


# -- the text -----------------------------------------------------------------------------

def dictd_entries(package: str, name: str) -> list:
    """The entries of a dictd dictionary (package's usr/share/dictd/NAME.index and .dict.dz,
    the latter gzip-compatible), in the index's order, without the database's own info
    entries. The index gives each entry's offset and length in base 64."""
    import gzip
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = {c: i for i, c in enumerate(digits)}

    def b64(s):
        n = 0
        for c in s:
            n = n * 64 + value[c]
        return n
    folder = package_root(package) / "usr" / "share" / "dictd"
    data = gzip.open(folder / f"{name}.dict.dz").read()
    entries, seen = [], set()
    for line in (folder / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")[:3]
        span = (b64(offset), b64(length))
        if word.startswith("00-database") or span in seen:
            continue
        seen.add(span)
        entries.append(data[span[0]:span[0] + span[1]].decode("utf-8", errors="replace").strip())
    entries.sort(key=lambda e: e.lower())
    return entries


def first_chars(texts, limit: int) -> list:
    """texts from the first, in order, until `limit` characters are reached (the text that
    reaches it included)."""
    kept, chars = [], 0
    for text in texts:
        if chars >= limit:
            break
        kept.append(text)
        chars += len(text)
    return kept


def grouped(entries: list, per_document: int) -> tuple:
    return tuple("\n\n".join(entries[i:i + per_document]) for i in range(0, len(entries), per_document))


def corpora(seed: int = 0):
    """(training corpora, held-out corpora): each evaluated corpus's documents shuffled with
    `seed`, a tenth held out (capped at HELD_OUT_CHARS of text), the rest for training."""
    fetch_packages(["dict-gcide", "dict-jargon"], log=lambda m: print(f"  {m}", flush=True))
    gcide = dictd_entries("dict-gcide", "gcide")
    rng = random.Random(seed)
    rng.shuffle(gcide)  # a sample of the whole alphabet, then grouped alphabetically
    kept = sorted(first_chars(gcide, GCIDE_CHARS), key=lambda e: e.lower())
    evaluated = [
        (load_corpus("austen"), "prose"),
        (load_corpus("kjv"), "scripture"),
        (load_corpus("cpython-stdlib"), "code"),
        (Corpus("gcide", grouped(kept, 40), str(package_root("dict-gcide")), "dictionary",
                "GPL-2+ (GCIDE; Webster's 1913 public domain)"), "dictionary"),
    ]
    jargon = Corpus("jargon", grouped(dictd_entries("dict-jargon", "jargon"), 20),
                    str(package_root("dict-jargon")), "prose", "public domain (the Jargon File)")
    train, held = [jargon], []
    for c, kind in evaluated:
        docs = list(c.documents)
        random.Random(seed).shuffle(docs)
        n_held = max(1, int(len(docs) * HELD_OUT))
        test = first_chars(docs[:n_held], HELD_OUT_CHARS)
        held.append(Corpus(f"{c.name}-heldout", tuple(test), c.source, kind, c.license))
        train.append(Corpus(f"{c.name}-train", tuple(docs[n_held:]), c.source, kind, c.license))
    return train, held


def token_stream(train, tokenizer) -> torch.Tensor:
    """Every training document, BOS first, one after another; the documents in a seeded order
    so no corpus sits in one block."""
    docs = [d for c in train for d in c.documents]
    random.Random(1).shuffle(docs)
    ids = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.int64)


# -- training ---------------------------------------------------------------------------

def make_model(size, tokenizer, seed: int):
    import transformers
    width, layers, heads, ffn = size
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=ffn, max_position_embeddings=SEQ,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def non_embedding(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def train(size, tokenizer, stream, seed: int, steps: int, save_at, out: Path, device: str):
    """mini_scaling.training_steps: AdamW, 5% linear warm-up then cosine decay to zero,
    gradients clipped at 1, random SEQ-token windows of the stream; a seed fixes both the
    initialisation and the data order. Saves the model at each step in save_at."""
    model = make_model(size, tokenizer, seed).to(device)
    # A step size falling as 1/width (as muP prescribes for hidden weights): the short schedules
    # of the small models want a large one (width 24: 0.02 ends 0.46 nats below 0.003).
    lr = min(2e-2, 1e-2 * 48 / size[0])
    losses = []
    # The miniature study's loop (its schedule, clipping and window sampling), its data drawn
    # from a generator seeded 1000 + seed.
    for step, loss in training_steps(model, stream, steps, BATCH, lr, 1000 + seed, device):
        losses.append(loss.item())
        if step in save_at:
            model.save_pretrained(out / f"checkpoint-{step}")
            tokenizer.save_pretrained(out / f"checkpoint-{step}")
    return losses


# -- evaluation -------------------------------------------------------------------------

def document_states(lm, corpus: Corpus, device: str) -> np.ndarray:
    """[documents, 2, V]: each held-out document's per-rank token counts and logp sums (float64),
    scored on its own with the windows `evaluate` gives it (whole SEQ-token windows overlapping
    by one token, BOS first)."""
    pad = lm.tokenizer.pad_token_id
    out = np.zeros((len(corpus.documents), 2, lm.vocab_size))
    with torch.no_grad():
        for i, doc in enumerate(corpus.documents):
            plan = plan_windows([doc], lm.tokenizer, Protocol(context_length=SEQ), SEQ)
            acc = RankAccumulator(lm.vocab_size)
            for _, batch in batches(plan.windows, 0, 16384, 128):
                input_ids, mask, labels = collate(batch, pad)
                acc.update(lm.logits(input_ids.to(device), mask.to(device)), labels.to(device))
            out[i, 0], out[i, 1] = acc.count.numpy(), acc.sum_logp.numpy()
    return out


def evaluate_model(path: Path, name: str, held, results: Path, device: str, per_document: bool):
    lm = load_model(str(path), device=device)
    lm.name, lm.family = name, "ladder"
    protocol = Protocol(context_length=SEQ, n_documents=10 ** 6, batch_size=64)
    out = {}
    for corpus in held:
        r = evaluate(lm, corpus, protocol, output_path=str(results), progress=False, max_batch_tokens=16384)
        if per_document:
            states = document_states(lm, corpus, device)
            # The documents scored one by one add up to what evaluate scored in its batches.
            assert int(states[:, 0].sum()) == r["decomposition"]["n_tokens"], (name, corpus.name)
            out[corpus.name] = states
    return lm.n_parameters["non_embedding"], out


# -- fits and intervals -------------------------------------------------------------------

def components(count: np.ndarray, sum_logp: np.ndarray) -> dict:
    d = decompose_counts(count, sum_logp)
    return {k: getattr(d, key) for k, key, _ in COMPONENTS}


def power_fits(x, values: dict) -> dict:
    """alpha, R^2 and scaling difference per component, as `rankops fit` computes them
    (rankops.scaling.component_fits), with R^2_EE - R^2_CE and the slope of EE/CE per decade."""
    f = component_fits(x, values)
    share = np.asarray(values["EE"]) / np.asarray(values["CE"])
    slope = float(np.polyfit(np.log10(x), share, 1)[0])
    return {"alpha": f["alpha"], "r_squared": f["r_squared"], "scaling_difference": f["scaling_difference"],
            "r_squared_EE_minus_CE": f["r_squared"]["EE"] - f["r_squared"]["CE"],
            "ee_share_slope_per_decade": slope}


def bootstrap(states: dict, params: dict, n_resamples: int, seed: int = 0) -> dict:
    """Percentile 95% intervals of power_fits, resampling seeds and documents together: in each
    resample every size draws its seeds with replacement and every corpus its held-out
    documents with replacement (the same documents for every model: paired)."""
    rng = np.random.default_rng(seed)
    by_size = {}
    for size_index, seed_ in sorted(params):
        by_size.setdefault(size_index, []).append((size_index, seed_))
    corpora_ = sorted({c for per in states.values() for c in per})
    draws = {c: [] for c in corpora_}
    for _ in range(n_resamples):
        picks = [run for i in sorted(by_size) for run in
                 (by_size[i][j] for j in rng.integers(0, len(by_size[i]), len(by_size[i])))]
        x = [params[run] for run in picks]
        for c in corpora_:
            n_docs = states[picks[0]][c].shape[0]
            w = np.bincount(rng.integers(0, n_docs, n_docs), minlength=n_docs).astype(np.float64)
            values = {k: [] for k, _, _ in COMPONENTS}
            for run in picks:
                s = states[run][c]
                comp = components(np.rint(w @ s[:, 0]).astype(np.int64), w @ s[:, 1])
                for k in values:
                    values[k].append(comp[k])
            draws[c].append(power_fits(x, values))
    out = {}
    for c, rows in draws.items():
        def interval(get):
            v = np.array([get(r) for r in rows])
            return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
        out[c] = {
            "alpha": {k: interval(lambda r, k=k: r["alpha"][k]) for k, _, _ in COMPONENTS},
            "r_squared": {k: interval(lambda r, k=k: r["r_squared"][k]) for k, _, _ in COMPONENTS},
            "scaling_difference": {k: interval(lambda r, k=k: r["scaling_difference"][k]) for k in ("EE", "SA", "Conf")},
            "r_squared_EE_minus_CE": interval(lambda r: r["r_squared_EE_minus_CE"]),
            "ee_share_slope_per_decade": interval(lambda r: r["ee_share_slope_per_decade"]),
            "n_resamples": n_resamples,
        }
    return out


def fmt_ci(value, ci, digits=3) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def tables(summary: dict) -> str:
    out = ["Per corpus: power law M = a X^-alpha over the 18 final models (X: non-embedding parameters; "
           "Conf as |Conf|), point estimate [95% interval over seeds and documents]", "",
           "| corpus | kind | R^2 CE | R^2 EE | R^2 SA | R^2 Conf | R^2 EE - R^2 CE |",
           "|---|---|---|---|---|---|---|"]
    for c, f in summary["fits"].items():
        ci = f["intervals"]
        out.append(f"| {c} | {f['kind']} | " + " | ".join(
            fmt_ci(f["r_squared"][k], ci["r_squared"][k]) for k, _, _ in COMPONENTS) +
            f" | {fmt_ci(f['r_squared_EE_minus_CE'], ci['r_squared_EE_minus_CE'])} |")
    out += ["", "| corpus | alpha CE | alpha EE | alpha SA | alpha Conf | EE/CE per decade |",
            "|---|---|---|---|---|---|"]
    for c, f in summary["fits"].items():
        ci = f["intervals"]
        out.append(f"| {c} | " + " | ".join(fmt_ci(f["alpha"][k], ci["alpha"][k], 4) for k, _, _ in COMPONENTS) +
                   f" | {fmt_ci(f['ee_share_slope_per_decade'], ci['ee_share_slope_per_decade'], 4)} |")
    out += ["", "Scaling difference |alpha_M - alpha_CE|", "", "| corpus | EE | SA | Conf |", "|---|---|---|---|"]
    for c, f in summary["fits"].items():
        ci = f["intervals"]["scaling_difference"]
        out.append(f"| {c} | " + " | ".join(fmt_ci(f["scaling_difference"][k], ci[k], 4)
                                          for k in ("EE", "SA", "Conf")) + " |")
    out += ["", "Saturating fit M = E + A X^-alpha (Huber in log space), CE and EE", "",
            "| corpus | CE: E | CE: alpha | CE: R^2 | EE: E | EE: alpha | EE: R^2 |", "|---|---|---|---|---|---|---|"]
    for c, f in summary["fits"].items():
        s = f["saturating"]
        out.append(f"| {c} | {s['CE']['E']:.3f} | {s['CE']['alpha']:.3f} | {s['CE']['r_squared']:.3f} | "
                   f"{s['EE']['E']:.3f} | {s['EE']['alpha']:.3f} | {s['EE']['r_squared']:.3f} |")
    out += ["", "Mean over seeds per size (nats per token)", "",
            "| size | non-embedding params | tokens trained | epochs | corpus | CE | EE | SA | Conf | EE/CE |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for m in summary["models"]:
        by.setdefault(m["size"], []).append(m)
    for size, ms in sorted(by.items()):
        for c in summary["fits"]:
            v = {k: np.mean([m["corpora"][c][k] for m in ms]) for k, _, _ in COMPONENTS}
            out.append(f"| {size} | {ms[0]['non_embedding_parameters']:,} | {ms[0]['tokens_trained']:,} | "
                       f"{ms[0]['epochs']:.2f} | {c} | {v['CE']:.4f} | {v['EE']:.4f} | {v['SA']:.4f} | "
                       f"{v['Conf']:.4f} | {v['EE'] / v['CE']:.3f} |")
    return "\n".join(out)


# -- the whole study ------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every width by sqrt(scale), about scale x the parameters (GPU runs)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    p.add_argument("--no-pretrained", action="store_true", help="skip SmolLM2 and Gemma 3")
    p.add_argument("--work", default=str(HERE / "work" / "ladder"), help="models (not committed)")
    p.add_argument("--quick", action="store_true",
                   help="a 2-size, 1-seed smoke run (a minute), written to WORK/quick unless --out")
    p.add_argument("--out", help="results folder (default: study/ladder, whose contents a run replaces)")
    p.add_argument("--analyse-only", action="store_true",
                   help="no training: recompute the fits, intervals, tables and figures from the "
                        "committed results (run.json, doc_states.npz, results/)")
    args = p.parse_args()
    out = Path(args.out) if args.out else (Path(args.work) / "quick" if args.quick else OUT)
    if args.analyse_only:
        analyse(out, args.bootstrap)
        return
    started = time.monotonic()
    work = Path(args.work)
    # Widths stay multiples of 2 x heads: rotary embeddings want an even head size.
    ladder = [(max(2 * h, int(round(w * math.sqrt(args.scale) / (2 * h))) * 2 * h), l, h,
               max(8, int(f * math.sqrt(args.scale)))) for w, l, h, f in LADDER]
    seeds, checkpointed = SEEDS, CHECKPOINTED
    if args.quick:
        ladder, seeds, checkpointed = ladder[:2], (0,), (1,)
    if out.exists():
        shutil.rmtree(out)
    results_dir = out / "results"

    print("corpora: fetching and splitting", flush=True)
    train_c, held = corpora()
    for c in train_c:
        print(f"  train {c.name}: {len(c)} documents, {sum(map(len, c.documents)) / 1e6:.1f} M chars")
    for c in held:
        print(f"  held out {c.name}: {len(c)} documents, {sum(map(len, c.documents)) / 1e6:.2f} M chars")
    tokenizer = train_tokenizer((d for c in train_c for d in c.documents), work / "tokenizer", VOCAB)
    stream = token_stream(train_c, tokenizer)
    print(f"tokenizer: {len(tokenizer)} words; training stream {len(stream):,} tokens "
          f"({time.monotonic() - started:.0f} s)", flush=True)

    models, states, params = [], {}, {}
    for i, size in enumerate(ladder):
        for seed in seeds:
            t0 = time.monotonic()
            n = non_embedding(make_model(size, tokenizer, seed))
            steps = math.ceil(TOKENS_PER_PARAM * n / (BATCH * SEQ))
            save_at = {steps}
            if i in checkpointed and seed == seeds[0]:
                save_at |= {max(1, steps // k) for k in (16, 8, 4, 2)}
            run = f"L{i}-d{size[0]}-s{seed}"
            losses = train(size, tokenizer, stream, seed, steps, save_at, work / run, args.device)
            t1 = time.monotonic()
            for step in sorted(save_at):
                final = step == steps
                n_eval, per_doc = evaluate_model(work / run / f"checkpoint-{step}", f"{run}-step{step}", held,
                                                 results_dir, args.device, per_document=final)
                if final:
                    states[(i, seed)], params[(i, seed)] = per_doc, n_eval
            tokens = steps * BATCH * SEQ
            models.append({"name": run, "size": i, "width": size[0], "layers": size[1], "heads": size[2],
                           "ffn": size[3], "seed": seed, "non_embedding_parameters": n, "steps": steps,
                           "tokens_trained": tokens, "epochs": tokens / len(stream),
                           "final_train_loss": float(np.mean(losses[-max(1, steps // 50):])),
                           "train_s": round(t1 - t0, 1), "eval_s": round(time.monotonic() - t1, 1)})
            print(f"{run}: {n:,} non-embedding parameters, {tokens:,} tokens ({tokens / len(stream):.2f} epochs), "
                  f"train loss {models[-1]['final_train_loss']:.3f}; trained in {t1 - t0:.0f} s, evaluated in "
                  f"{time.monotonic() - t1:.0f} s", flush=True)

    if not args.no_pretrained:
        for spec in PRETRAINED:
            t0 = time.monotonic()
            lm = load_model(spec, device=args.device)
            for corpus in held:
                evaluate(lm, corpus, Protocol(context_length=2048, n_documents=10 ** 6, max_tokens=PRETRAINED_TOKENS),
                         output_path=str(out / "pretrained"), progress=False, max_batch_tokens=8192)
            print(f"{spec}: evaluated in {time.monotonic() - t0:.0f} s", flush=True)
            del lm

    setup = {"ladder": [list(s) for s in ladder], "seeds": list(seeds), "vocab": VOCAB, "context": SEQ,
             "batch_tokens": BATCH * SEQ, "tokens_per_parameter": TOKENS_PER_PARAM,
             "training_stream_tokens": int(len(stream)), "device": args.device,
             "training_corpora": {c.name: {"documents": len(c), "kind": c.kind, "license": c.license,
                                           "chars": sum(map(len, c.documents))} for c in train_c},
             "held_out": {c.name: {"documents": len(c), "kind": c.kind, "license": c.license,
                                   "tokens": int(states[min(states)][c.name][:, 0].sum())} for c in held},
             "minutes_to_train_and_evaluate": round((time.monotonic() - started) / 60, 1)}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "doc_states.npz", **{f"{i}-{seed}-{c}": a for (i, seed), per in states.items()
                                                   for c, a in per.items()})
    write_atomic(out / "run.json", (json.dumps({"setup": setup, "models": models}, indent=1) + "\n").encode())
    analyse(out, args.bootstrap)
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


def analyse(out: Path, n_resamples: int) -> dict:
    """Everything after the models: from out's results, run.json and doc_states.npz (what a run
    leaves), the fits, intervals, summary.json, tables.md and figures/. `--analyse-only` runs
    this alone on the committed data."""
    run = json.loads((out / "run.json").read_text())
    setup, models = run["setup"], run["models"]
    with np.load(out / "doc_states.npz") as npz:
        states = {}
        for key in npz.files:
            i, seed, corpus = key.split("-", 2)
            states.setdefault((int(i), int(seed)), {})[corpus] = npz[key]
    by_run = {(m["size"], m["seed"]): m for m in models}
    params = {r: m["non_embedding_parameters"] for r, m in by_run.items()}
    held = sorted(setup["held_out"])
    results = load_results([str(out / "results")])
    # The parameter counts rankops eval recorded are the ones fitted here too.
    recorded = {r["model"]["name"]: r["model"]["n_parameters"]["non_embedding"] for r in results}
    assert all(recorded[f"{m['name']}-step{m['steps']}"] == m["non_embedding_parameters"] for m in models)
    finals_text = models_markdown(model_rows(results))
    fit_text = markdown(scaling_tables(results))
    for m in models:
        per = states[(m["size"], m["seed"])]
        m["corpora"] = {c: components(per[c][:, 0].sum(0).astype(np.int64), per[c][:, 1].sum(0)) for c in held}
    runs = sorted(states)
    x = [params[r] for r in runs]
    intervals = bootstrap(states, params, n_resamples)
    fits = {}
    for c in held:
        values = {k: [by_run[r]["corpora"][c][k] for r in runs] for k, _, _ in COMPONENTS}
        f = power_fits(x, values)
        sat = {}
        for k in ("CE", "EE"):
            fit = fit_saturating(x, values[k], name=k)
            sat[k] = {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "r_squared": fit.r_squared,
                      "converged": fit.converged}
        fits[c] = dict(f, kind=setup["held_out"][c]["kind"], saturating=sat, intervals=intervals[c])
    pretrained = []
    if (out / "pretrained").exists():
        for r in load_results([str(out / "pretrained")]):
            d = r["decomposition"]
            pretrained.append({"model": r["model"]["name"], "family": r["model"]["family"],
                               "non_embedding_parameters": r["model"]["n_parameters"]["non_embedding"],
                               "corpus": r["corpus"]["name"], "tokens": r["n_tokens"],
                               **{k: d[key] for k, key, _ in COMPONENTS}})
    summary = {"setup": dict(setup, bootstrap_resamples=n_resamples), "models": models, "fits": fits,
               "pretrained": pretrained}
    text = tables(summary)
    write_atomic(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(out / "tables.md", "\n\n".join([text, "rankops fit on the final models:", fit_text,
                                                 finals_text]).encode() + b"\n")
    figures = out / "figures"
    if figures.exists():
        shutil.rmtree(figures)
    # One panel per model and corpus is too many at 18 models: the rank distributions and P
    # against Q show seed 0's final models only (every size, every corpus); the other figures
    # every model.
    plot_all(results, str(figures), figures=("components_vs_step", "scaling", "shares"))
    seed0 = [r for r in final_points(results) if "-s0-" in r["model"]["name"]]
    plot_all(seed0, str(figures), figures=("rank_distribution", "p_vs_q"))
    print(text)
    return summary


if __name__ == "__main__":
    main()
