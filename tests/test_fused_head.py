"""rankops eval's fused output layer (issue 14, `--fused-head`): tiny random transformers models
scored from their last hidden states (RankAccumulator.update_linear) against their own logits,
which models qualify (tied, untied with a bias) and which fall back (soft-capped logits, a
forward that changes its logits), what the results say, and resumes across the two paths."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import rankops
from rankops.cli import main
from rankops.eval.models import FusedHeadError, linear_head, load_model, wrap_model
from rankops.eval.run import EvalError, evaluate
from rankops.eval.windows import Protocol, collate, plan_windows
from rankops.ops.accumulate import COUNT, COUNT_PESS
from test_eval import corpus, make_documents, tokenizer  # noqa: F401 (fixtures)

SIZES = dict(max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, intermediate_size=64)


def config(kind, vocab):
    if kind == "llama-tied":
        return transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **SIZES)
    if kind == "phi-bias":  # Phi's output layer is untied and has a bias
        return transformers.PhiConfig(vocab_size=vocab, tie_word_embeddings=False, **SIZES)
    if kind == "gemma3":  # the real gemma3-270m's architecture: no soft-capping, tied
        return transformers.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=8, **SIZES)
    if kind == "gemma2-softcap":
        return transformers.Gemma2Config(vocab_size=vocab, head_dim=16, final_logit_softcapping=30.0, **SIZES)
    if kind == "gemma3-softcap":
        return transformers.Gemma3TextConfig(vocab_size=vocab, head_dim=16, sliding_window=8,
                                             final_logit_softcapping=30.0, **SIZES)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory):  # noqa: F811
    dirs = {}
    for i, kind in enumerate(("llama-tied", "phi-bias", "gemma3", "gemma2-softcap", "gemma3-softcap")):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config(kind, len(tokenizer) + 5))
        if kind == "phi-bias":
            torch.nn.init.normal_(model.lm_head.bias, std=0.5)  # zero at init: make it count
        dirs[kind] = tmp_path_factory.mktemp(kind) / kind
        model.save_pretrained(dirs[kind])
        tokenizer.save_pretrained(dirs[kind])
    return dirs


PROTOCOL = Protocol(context_length=16, batch_size=4, max_tokens=None)


def direct_stats(lm, corpus, linear):  # noqa: F811
    """Per-token rank, ties and logp of every scored token, from the model's own logits
    (model(...).logits) and from F.linear of its decoder's last hidden state, batch by batch."""
    plan = plan_windows(corpus.documents, lm.tokenizer, PROTOCOL, 16)
    model_s, linear_s = [], []
    with torch.no_grad():
        for i in range(0, len(plan.windows), PROTOCOL.batch_size):
            ids, mask, labels = collate(plan.windows[i:i + PROTOCOL.batch_size], lm.tokenizer.pad_token_id)
            z_model = lm.logits(ids, mask)[..., :lm.vocab_size]
            z_linear = torch.nn.functional.linear(linear.hidden_states(ids, mask), linear.weight,
                                                  linear.bias)[..., :lm.vocab_size]
            keep = labels != -100
            model_s.append(rankops.token_stats(z_model[keep], labels[keep], backend="cpu"))
            linear_s.append(rankops.token_stats(z_linear[keep], labels[keep], backend="cpu"))
    return model_s, linear_s


@pytest.mark.parametrize("kind", ["llama-tied", "phi-bias", "gemma3"])
def test_fused_equals_logits(model_dirs, corpus, kind, tmp_path):  # noqa: F811
    lm = load_model(str(model_dirs[kind]))
    linear = linear_head(lm)
    assert (linear.bias is not None) == (kind == "phi-bias")
    assert (linear.weight is lm.model.get_input_embeddings().weight) == (kind != "phi-bias")
    fused = evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "fused"), progress=False, fused_head="on")
    logits = evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "logits"), progress=False,
                      fused_head="off")
    assert fused["head"]["path"] == fused["compute"]["head"] == "fused"
    assert logits["head"]["path"] == logits["compute"]["head"] == "logits"
    for results in (fused, logits):  # what results.json says is what evaluate returned
        on_disk = json.loads(open(results["path"]).read())
        assert on_disk["head"] == results["head"] and on_disk["compute"] == results["compute"]
    # The fused logits are F.linear's up to rounding (other matmul shapes). Where they are
    # the same values (checked here, token by token) ranks and ties must agree exactly.
    model_s, linear_s = direct_stats(lm, corpus, linear)
    exact = torch.cat([(a.rank == b.rank) & (a.ties == b.ties) for a, b in zip(model_s, linear_s)])
    assert bool(exact.all()), "the model's logits are not F.linear of its last hidden state"
    rank = torch.cat([s.rank for s in model_s])
    ties = torch.cat([s.ties for s in model_s])
    stats = {name: torch.load(tmp_path / name / lm.name / "words" / "accumulator.pt")["stats"]
             for name in ("fused", "logits")}
    for name in ("fused", "logits"):
        # Ranks are integers: the histograms by strict and by pessimistic rank, exactly.
        assert torch.equal(stats[name][COUNT], torch.bincount(rank, minlength=lm.vocab_size)), name
        assert torch.equal(stats[name][COUNT_PESS], torch.bincount(rank + ties, minlength=lm.vocab_size)), name
    assert fused["n_tokens"] == logits["n_tokens"] == rank.numel()
    for key in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert fused["decomposition"][key] == pytest.approx(logits["decomposition"][key], abs=1e-6), key
    assert fused["decomposition"]["error_entropy"] == logits["decomposition"]["error_entropy"]  # ranks only


@pytest.mark.parametrize("kind", ["gemma2-softcap", "gemma3-softcap"])
def test_soft_capped_logits_fall_back_or_are_refused(model_dirs, corpus, kind, tmp_path):  # noqa: F811
    lm = load_model(str(model_dirs[kind]))
    with pytest.raises(FusedHeadError, match="final_logit_softcapping=30.0"):
        linear_head(lm)
    with pytest.raises(EvalError, match="fused head on, but .*final_logit_softcapping=30.0"):
        evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path), progress=False, fused_head="on")
    assert not list(tmp_path.iterdir())  # refused before anything was planned or written
    auto = evaluate(lm, corpus, PROTOCOL, progress=False)  # auto, the default
    assert auto["head"] == {"path": "logits", "requested": "auto", "reason": auto["head"]["reason"]}
    assert "final_logit_softcapping" in auto["head"]["reason"]
    off = evaluate(lm, corpus, PROTOCOL, progress=False, fused_head="off")
    assert off["head"]["path"] == "logits" and off["decomposition"] == auto["decomposition"]


class ScaledLlama(transformers.LlamaForCausalLM):
    """A forward that changes the logits with nothing in its config to say so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_a_forward_that_changes_its_logits_is_caught_by_the_probe(tokenizer, corpus):  # noqa: F811
    torch.manual_seed(0)
    model = ScaledLlama(config("llama-tied", len(tokenizer))).eval()
    lm = wrap_model(model, tokenizer, name="scaled")
    with pytest.raises(FusedHeadError, match="not its output layer applied to its decoder's last hidden state"):
        linear_head(lm)
    assert evaluate(lm, corpus, PROTOCOL, progress=False)["head"]["path"] == "logits"
    # A bare callable has no output layer to read.
    table = torch.randn(len(tokenizer), len(tokenizer))
    bare = wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name="bigram", context_length=16)
    with pytest.raises(EvalError, match="not a transformers model"):
        evaluate(bare, corpus, PROTOCOL, progress=False, fused_head="on")


def test_a_resume_keeps_the_path_or_refuses(model_dirs, corpus, tmp_path):  # noqa: F811
    lm = load_model(str(model_dirs["llama-tied"]))
    want = evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "full"), progress=False)
    assert want["head"]["path"] == "fused"  # auto picks it for a plain linear head on the CPU

    def ctrl_c(written):
        if written.batches_done >= 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "cut"), progress=False, checkpoint_every_s=0,
                 on_checkpoint=ctrl_c)
    with pytest.raises(EvalError, match="different run .*compute.head: 'fused' there, 'logits' now"):
        evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "cut"), resume=True, progress=False,
                 fused_head="off")
    got = evaluate(lm, corpus, PROTOCOL, output_path=str(tmp_path / "cut"), resume=True, progress=False)
    assert got["decomposition"] == want["decomposition"]  # bit for bit, on the same path


def test_the_command_says_which_path_ran(model_dirs, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, d in enumerate(make_documents(6, 4)):
        (docs / f"{i}.txt").write_text(d)
    common = ["eval", "--corpus", str(docs), "--context-length", "16", "--no-progress"]
    assert main([*common, "--model", str(model_dirs["llama-tied"]), "--output-path", str(tmp_path / "a")]) == 0
    assert main([*common, "--model", str(model_dirs["llama-tied"]), "--output-path", str(tmp_path / "b"),
                 "--fused-head", "off"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("| ties | head |")
    assert table[2].endswith("| fused |") and table[-1].endswith("| logits |")
    for out, path in (("a", "fused"), ("b", "logits")):
        results = json.loads(next((tmp_path / out).glob("*/*/results.json")).read_text())
        assert results["head"]["path"] == path
    assert main([*common, "--model", str(model_dirs["gemma2-softcap"]), "--output-path", str(tmp_path / "c"),
                 "--fused-head", "on"]) == 2
    err = capsys.readouterr().err
    assert "rankops eval: error: fused head on, but" in err and "final_logit_softcapping" in err
    assert not list((tmp_path / "c").glob("*/*"))
