"""The command line's first contact: --version, one-line errors for a missing optional module,
every eval argument checked before a model loads, --max-tokens, eval --help, the progress bar.
No model is loaded here: where a command would load one, load_model is replaced by a failure."""
import argparse
import io
import subprocess
import sys
import time

import pytest
import torch

import rankops
from rankops.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rankops {rankops.__version__} (torch {torch.__version__};")
    assert out.count("\n") == 1
    for backend in rankops.available_backends():
        assert backend in out.split("backends here:")[1]


def run_without(module, argv):
    """The command line in a fresh interpreter where `module` cannot be imported."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from rankops.cli import main; sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module,argv", [
    ("transformers", ["eval", "--model", "smollm2", "--corpus", "cpython-stdlib"]),
    ("tqdm", ["eval", "--model", "smollm2", "--corpus", "cpython-stdlib"]),
    ("matplotlib", ["plot", "results.json", "--output-dir", "FIGURES"]),
])
def test_missing_optional_module_is_one_line_naming_the_extra(module, argv, tmp_path):
    argv = [str(tmp_path / "figures") if a == "FIGURES" else a for a in argv]
    r = run_without(module, argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert module in r.stderr and 'pip install "rankops[eval]"' in r.stderr
    assert not (tmp_path / "figures").exists()  # plot leaves no empty folder


def test_module_missing_deep_inside_a_command_is_one_line(monkeypatch, capsys):
    def needs_gguf(args):
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
    monkeypatch.setattr(rankops.cli.fit, "run", needs_gguf)
    assert main(["fit", "x.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "rankops[eval]"' in err

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'nowhere'", name="nowhere")
    monkeypatch.setattr(rankops.cli.fit, "run", needs_something_else)
    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a real bug, shown whole
        main(["fit", "x.json"])


def test_austen_without_rdata_names_the_extra(monkeypatch):
    from rankops.eval.corpora import CorpusError, builtin, load_corpus
    if builtin._austen_data_dir() is None:
        pytest.skip("janeaustenr's data is not here (rankops corpora fetch austen)")
    monkeypatch.setitem(sys.modules, "rdata", None)
    builtin.BUILTINS["austen"].load.cache_clear()
    try:
        with pytest.raises(CorpusError, match=r'rdata package.*pip install "rankops\[eval\]"'):
            load_corpus("austen")
    finally:
        builtin.BUILTINS["austen"].load.cache_clear()


# --- eval: every check before a model loads ---------------------------------------------------

@pytest.fixture
def no_model_loads(monkeypatch):
    """Makes loading a model a test failure: the checks must come first."""
    import rankops.eval.models

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(rankops.eval.models, "load_model", load_model)


@pytest.fixture
def model_folder(tmp_path):
    """A spec that passes the checks (a folder with a config.json) and is never read."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def eval_args(model_folder, tmp_path, *extra):
    return ["eval", "--model", model_folder, "--corpus", "cpython-stdlib", "--no-progress",
            "--output-path", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra,message", [
    (["--device", "cpu", "--backend", "cuda"], "--backend cuda"),
    (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
    (["--model", "no-such-builtin"], "neither an existing path"),
    (["--model", "missing.gguf"], "model file missing.gguf does not exist"),
    (["--corpus", "no-such-corpus"], "unknown corpus 'no-such-corpus'"),
    (["--stride", "9", "--context-length", "8"], "--stride 9 must be shorter than --context-length 8"),
    (["--stride", "8", "--context-length", "8"], "--stride 8 must be shorter than --context-length 8"),
    (["--stride", "4", "--lm-eval-windows"], "--stride does not apply"),
    (["--step", "1", "--step", "2"], "--step was given 2 times for 1 models"),
])
def test_eval_checks_arguments_before_loading_a_model(no_model_loads, model_folder, tmp_path, capsys,
                                                      extra, message):
    assert main(eval_args(model_folder, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_eval_checks_the_output_folder_without_creating_it(no_model_loads, model_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(eval_args(model_folder, tmp_path, "--output-path", str(blocker / "out"))) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # A folder that does not exist yet is fine, and the checks create nothing.
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(eval_args(model_folder, tmp_path, "--output-path", str(tmp_path / "new" / "out")))
    assert not (tmp_path / "new").exists()


def parse_eval(*argv):
    return build_parser().parse_args(["eval", "--model", "m", "--corpus", "c", *argv])


@pytest.mark.parametrize("text,tokens", [("20000", 20000), ("10k", 10_000), ("10K", 10_000),
                                         ("1.5M", 1_500_000), ("2m", 2_000_000), ("1_000", 1000),
                                         ("all", None), ("ALL", None)])
def test_max_tokens_accepts_counts_suffixes_and_all(text, tokens):
    assert parse_eval("--max-tokens", text).max_tokens == tokens


@pytest.mark.parametrize("text", ["0", "-5", "0k", "1.2345k", "ten", "", "k", "1e3"])
def test_max_tokens_refuses_the_rest_naming_the_option(text, capsys):
    with pytest.raises(SystemExit) as info:
        parse_eval("--max-tokens", text)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-tokens:" in err and "_max_tokens" not in err


@pytest.mark.parametrize("option", ["--n-documents", "--batch-size", "--batch-tokens", "--context-length",
                                    "--stride"])
def test_counts_must_be_positive(option, capsys):
    with pytest.raises(SystemExit):
        parse_eval(option, "0")
    assert f"argument {option}: expected a positive integer, got '0'" in capsys.readouterr().err


def eval_subparser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"]


def test_eval_help_documents_every_option():
    e = eval_subparser()
    for action in e._actions:
        assert action.help, action.option_strings
    text = " ".join(e.format_help().split())  # unwrapped
    for shown in ("{auto,cuda,triton,cpu,torch}", "{float32,bfloat16,float16}", "(default: 20000)",
                  "(default: rankops_results)", "(default: float32)", "(default: auto)", "--no-progress"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


def test_corpora_fetch_refuses_unknown_names(capsys):
    assert main(["corpora", "fetch", "cpython-stdlib"]) == 2  # comes with Python: nothing to fetch
    assert "austen, kjv" in capsys.readouterr().err


# --- progress ---------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_while_a_batch_runs():
    from tqdm import tqdm

    from rankops.eval.run import _LiveBar
    screen = _Terminal()
    bar = _LiveBar(tqdm(total=30, file=screen, mininterval=0), n_batches=3, batches_done=0, every_s=0.2)
    try:
        time.sleep(1.1)  # one batch's forward pass: the bar is redrawn meanwhile
        redraws = screen.getvalue().count("\r")
        assert redraws >= 4 and "batch 1/3" in screen.getvalue()
        bar.update(10)
        assert "batch 2/3" in screen.getvalue().split("\r")[-1]
    finally:
        bar.close()
    assert bar._thread is not None and not bar._thread.is_alive()
