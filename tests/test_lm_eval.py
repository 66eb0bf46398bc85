"""The lm-evaluation-harness adapter hf-rankops, offline, on tiny randomly initialised models:
it must decompose exactly the tokens lm-eval scores, as `rankops eval` with lm-eval's windows
does, and leave lm-eval's own results untouched."""
import json
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lm_eval.tasks import TaskManager

from rankops.accumulate import COUNT, COUNT_PESS, RankAccumulator
from rankops.cli import main as rankops_main
from rankops.eval.corpora import CorpusError, load_corpus
from rankops.eval.models import load_model
from rankops.eval.run import evaluate
from rankops.eval.windows import Protocol, plan_windows, select_documents
from rankops.integrations.lm_eval import TASKS_DIR, RankopsHFLM, load_corpus_dataset, local_task

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
CONTEXT = 16   # lm-eval's max_length and rankops' context_length: documents span 1 to 6 windows
EXTRA_LOGITS = 7  # a padded output layer: its columns must not count, on either side
WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from "
         "or have an they which one you were her all she there would their we him been has when who "
         "will more no if out so said what up its about into than them can only other new some").split()
VALUES = ("cross_entropy", "error_entropy", "self_alignment", "confidence", "top1_accuracy",
          "mean_reciprocal_rank")


def make_documents(n_docs, seed):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(1, 70, (1,), generator=g)),), generator=g)
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    return docs


def make_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(make_documents(200, 0), trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    if add_bos:  # like Llama's tokenizers: the tokenizer itself adds BOS, and lm-eval keeps it
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """GPT-2 with a tokenizer that adds nothing; Llama with one that adds BOS itself."""
    paths = {}
    for family in ("gpt2", "llama"):
        tokenizer = make_tokenizer(add_bos=family == "llama")
        vocab = len(tokenizer) + EXTRA_LOGITS
        if family == "gpt2":
            config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)
        else:
            config = transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              intermediate_size=64)
        torch.manual_seed(0)
        paths[family] = tmp_path_factory.mktemp(family) / "model"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(paths[family])
        tokenizer.save_pretrained(paths[family])
    return paths


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request, model_dirs):
    return model_dirs[request.param]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A folder of text files, and a .jsonl file whose text is in the field "body"."""
    root = tmp_path_factory.mktemp("corpora")
    (root / "docs").mkdir()
    for i, d in enumerate(make_documents(14, 1)):
        (root / "docs" / f"{i:03d}.txt").write_text(d + "\n")
    with open(root / "notes.jsonl", "w") as f:
        for d in make_documents(10, 2):
            f.write(json.dumps({"body": d, "id": 0}) + "\n")
    return root


def rankops_eval(model_dir, spec, text_field="text", batch_size=4, output_path=None):
    """`rankops eval` on the same windows as lm-eval (Protocol(lm_eval_windows=True)); the
    paper's document selection (1000 shuffled with seed 42) keeps every document here."""
    protocol = Protocol(context_length=CONTEXT, max_tokens=None, batch_size=batch_size, lm_eval_windows=True)
    return evaluate(load_model(str(model_dir)), load_corpus(spec, text_field=text_field), protocol,
                    output_path=output_path, progress=False)


def assert_same_decomposition(got: dict, want: dict):
    for ties in ("decomposition", "decomposition_pessimistic"):
        g, w = got[ties], want[ties]
        assert (g["n_tokens"], g["n_distinct_ranks"]) == (w["n_tokens"], w["n_distinct_ranks"]), ties
        for k in VALUES:
            assert abs(g[k] - w[k]) <= 1e-9, (ties, k, g[k], w[k])


def test_adapter_equals_rankops_eval_on_the_same_windows(model_dir, corpora, tmp_path):
    # Two rolling tasks in one run: a task written for the folder (documents selected and
    # ordered as rankops eval does, so the batches match too), and the shipped
    # rankops_local_text reading the jsonl file from lm-eval's metadata.
    include_path, task = local_task(corpora / "docs", n_documents=1000, output_dir=tmp_path / "task")
    manager = TaskManager(include_path=[include_path, str(TASKS_DIR)], include_defaults=False,
                          metadata={"corpus": str(corpora / "notes.jsonl"), "text_field": "body",
                                    "n_documents": 1000})
    lm = RankopsHFLM(pretrained=str(model_dir), device="cpu", dtype="float32", max_length=CONTEXT, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=[task, "rankops_local_text"], task_manager=manager,
                                      bootstrap_iters=0)
    reported = results["config"]["rankops"]["tasks"]
    assert set(reported) == set(lm.accumulators) == {task, "rankops_local_text"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    for name, spec, field in ((task, corpora / "docs", "text"), ("rankops_local_text", corpora / "notes.jsonl", "body")):
        want = rankops_eval(model_dir, str(spec), field, output_path=str(tmp_path / "rankops"))
        assert_same_decomposition(reported[name], want)
        # Every token of every document, each once: counted independently of both windowings.
        documents = load_corpus(str(spec), text_field=field).documents
        assert reported[name]["n_tokens"] == sum(len(tokenizer(d)["input_ids"]) for d in documents)
        saved = RankAccumulator(lm.rankops_vocab_size)
        saved.load_state_dict(torch.load(os.path.join(os.path.dirname(want["path"]), "accumulator.pt")))
        for row in (COUNT, COUNT_PESS):  # the per-rank histograms, integers: exactly equal
            assert torch.equal(lm.accumulators[name].stats[row], saved.stats[row])
        assert lm.decompositions[name].cross_entropy == reported[name]["decomposition"]["cross_entropy"]
    both = lm.decomposition
    assert both.n_tokens == sum(r["n_tokens"] for r in reported.values())


def test_lm_eval_results_are_those_of_the_hf_model(corpora, tmp_path):
    # The adapter only reads the logits: lm-eval's own numbers are the hf model's, bit for bit.
    model_dir = tmp_path / "model"
    tokenizer = make_tokenizer(add_bos=False)
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    include_path, task = local_task(corpora / "docs", output_dir=tmp_path / "task")
    runs = {}
    for model in ("hf", "hf-rankops"):  # hf-rankops by name: registered by the import above
        runs[model] = lm_eval.simple_evaluate(
            model=model, model_args=f"pretrained={model_dir},device=cpu,dtype=float32,max_length={CONTEXT}",
            tasks=[task], batch_size=3, task_manager=TaskManager(include_path=include_path, include_defaults=False),
            bootstrap_iters=0)
    assert runs["hf"]["results"] == runs["hf-rankops"]["results"]
    assert "rankops" not in runs["hf"]["config"]
    d = runs["hf-rankops"]["config"]["rankops"]["tasks"][task]["decomposition"]
    # Without padded columns both sides normalise over the same vocabulary: lm-eval's
    # word perplexity and rankops' CE are the same total log-likelihood, in fp32 and fixed point.
    documents = load_corpus(str(corpora / "docs")).documents
    n_words = sum(len(doc.split()) for doc in documents)
    total_nll = n_words * torch.log(torch.tensor(runs["hf"]["results"][task]["word_perplexity,none"],
                                                 dtype=torch.float64)).item()
    assert total_nll == pytest.approx(d["cross_entropy"] * d["n_tokens"], rel=1e-5)


def test_rankops_lm_eval_command(model_dirs, corpora, tmp_path):
    model_dir, out = model_dirs["llama"], tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "rankops", "lm-eval", "--corpus", str(corpora / "docs"),
                        "--n-documents", "1000", "--model_args",
                        f"pretrained={model_dir},dtype=float32,max_length={CONTEXT}", "--device", "cpu",
                        "--batch_size", "4", "--output_path", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **OFFLINE, RANKOPS_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| rankops_docs | " in r.stdout and "| task | tokens | CE | EE | SA | Conf |" in r.stdout
    (results_file,) = out.glob("*/results_*.json")
    saved = json.loads(results_file.read_text())
    assert saved["config"]["model"] == "hf-rankops"
    assert list((tmp_path / "cache" / "lm_eval_tasks").glob("rankops_docs-*/rankops_docs.yaml"))
    assert_same_decomposition(saved["config"]["rankops"]["tasks"]["rankops_docs"],
                              rankops_eval(model_dir, str(corpora / "docs")))


def test_rankops_lm_eval_refuses_other_models_and_the_answer_cache(capsys):
    assert rankops_main(["lm-eval", "--model", "hf", "--tasks", "rankops_local_text"]) == 2
    assert "always hf-rankops" in capsys.readouterr().err
    assert rankops_main(["lm-eval", "--tasks", "x", "--use_cache", "/tmp/cache"]) == 2
    assert "--use_cache" in capsys.readouterr().err


@pytest.mark.parametrize("context_length", [2, 3, 7, 16])
def test_lm_eval_windows_are_lm_evals(context_length):
    # plan_windows(lm_eval_windows=True) against lm-eval's own window functions, for documents
    # of every length from 1 to 4 windows and more, with and without a tokenizer-added BOS.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for add_bos in (False, True):
        tokenizer = make_tokenizer(add_bos)
        prefix = tokenizer.bos_token_id
        documents = [" ".join(WORDS[:n]) for n in range(1, 4 * context_length + 3)]
        plan = plan_windows(documents, tokenizer, Protocol(n_documents=len(documents), context_length=context_length,
                                                           max_tokens=None, lm_eval_windows=True), context_length)
        got = [(list(w.tokens[:w.input_length]), w.first_scored, list(w.tokens[w.first_scored + 1:][:w.n_scored]))
               for w in plan.windows]
        want = []
        for doc in select_documents(documents, len(documents), 42):  # the protocol's order
            ids = tokenizer(doc)["input_ids"]
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=prefix, max_seq_len=context_length, context_len=1)):
                inp = (context + continuation)[-(context_length + 1):][:-1]
                want.append((inp, len(inp) - len(continuation), continuation))
        assert got == want
        assert plan.n_scored_tokens == sum(len(tokenizer(d)["input_ids"]) for d in documents)


def test_protocol_default_is_unchanged_and_options_are_checked():
    assert "lm_eval_windows" not in Protocol().as_dict()  # results and resume identity as before
    assert Protocol(lm_eval_windows=True).as_dict()["lm_eval_windows"] is True
    with pytest.raises(ValueError, match="stride"):
        Protocol(context_length=8, stride=4, lm_eval_windows=True)
    with pytest.raises(ValueError, match="prefix token"):
        Protocol(add_bos=False, lm_eval_windows=True)


def test_local_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError):
        local_task(tmp_path / "no-such-corpus.txt")
    monkeypatch.delenv("RANKOPS_LM_EVAL_CORPUS", raising=False)
    with pytest.raises(ValueError, match="needs a corpus"):
        load_corpus_dataset()
    (tmp_path / "a.txt").write_text("one document\n")
    monkeypatch.setenv("RANKOPS_LM_EVAL_CORPUS", str(tmp_path / "a.txt"))
    assert load_corpus_dataset()["test"]["text"] == ["one document"]


def test_installed_lm_eval_is_a_pinned_version_with_the_private_hooks_the_adapter_overrides():
    # The adapter overrides private HFLM methods: an lm-eval outside the pinned, tested range
    # must fail here, loudly, rather than decompose the wrong tokens.
    import inspect
    import tomllib
    from pathlib import Path

    from lm_eval.models.huggingface import HFLM
    from packaging.requirements import Requirement

    from rankops.integrations.lm_eval import PRIVATE_HFLM_OVERRIDES
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["lm-eval"]]
    assert pin.name == "lm-eval" and pin.specifier, "lm-eval must be pinned to the tested versions"
    assert pin.specifier.contains(lm_eval.__version__), (lm_eval.__version__, str(pin.specifier))
    assert any("rankops[" in r and "lm-eval" in r for r in pyproject["project"]["optional-dependencies"]["test"])
    for name, params in PRIVATE_HFLM_OVERRIDES.items():
        assert callable(getattr(HFLM, name, None)), f"HFLM.{name} is gone"
        assert tuple(inspect.signature(getattr(HFLM, name)).parameters) == params, name
