"""`rankops plot` on real `rankops eval` output: tiny GPT-2 checkpoints and sizes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
transformers = pytest.importorskip("transformers")

from rankops.cli import main
from rankops.eval.corpora import Corpus
from rankops.eval.models import load_model
from rankops.eval.run import evaluate
from rankops.eval.windows import Protocol
from rankops.plot import plot_all
from rankops.scaling import final_points, load_results
from test_eval import make_documents, tiny_config

FIGURES = ("components_vs_step", "rank_distribution", "p_vs_q", "scaling", "shares")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(make_documents(200, 0), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    root = tmp_path_factory.mktemp("plot")
    corpus = Corpus(name="words", documents=tuple(make_documents(20, 1)), source="test", kind="user", license="test")
    runs = [("run/checkpoint-%d" % s, 32, s) for s in (10, 100, 1000)] + [("size48", 48, None), ("size64", 64, None)]
    for name, width, step in runs:
        torch.manual_seed(step or width)
        config = tiny_config("gpt2", len(tokenizer))
        config.n_embd = width
        model = transformers.AutoModelForCausalLM.from_config(config)
        path = root / "models" / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        evaluate(load_model(str(path)), corpus, Protocol(context_length=16), output_path=str(root / "results"),
                 progress=False)
    return root / "results"


def test_every_figure_is_written_with_its_axes(results_dir, tmp_path):
    import matplotlib.pyplot as plt
    results = load_results([str(results_dir)])
    written = plot_all(results, str(tmp_path))
    assert sorted(p.name for p in written) == sorted(f"{f}.{e}" for f in FIGURES for e in ("png", "pdf"))
    for p in written:
        assert p.stat().st_size > 1000
    # the checkpoint series counts once, at its final step: three model sizes
    finals = final_points(results)
    assert len(finals) == 3 and len({r["model"]["n_parameters"]["non_embedding"] for r in finals}) == 3
    png = plt.imread(tmp_path / "scaling.png")
    assert png.shape[0] > 200 and png.std() > 0.01  # something was drawn


def test_axes_and_data(results_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    import rankops.plot
    saved, drawn = {}, []
    original, original_write = matplotlib.figure.Figure.savefig, rankops.plot.write_atomic

    def spy(fig, fname, **kw):  # the figure is rendered to memory, then written atomically
        drawn.append([(ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale(), ax.get_yscale(),
                       [line.get_ydata() for line in ax.get_lines()]) for ax in fig.axes])
        return original(fig, fname, **kw)

    def spy_write(path, data):
        saved[str(path)] = drawn.pop()
        return original_write(path, data)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    monkeypatch.setattr(rankops.plot, "write_atomic", spy_write)
    results = load_results([str(results_dir)])
    plot_all(results, str(tmp_path))
    axes = {k.rsplit("/", 1)[1].rsplit(".", 1)[0]: v for k, v in saved.items() if k.endswith(".png")}
    assert axes["rank_distribution"][0][:4] == ("rank of the correct token + 1", "P(rank): share of tokens", "log", "log")
    assert axes["scaling"][0][0] == "non-embedding parameters" and axes["scaling"][0][2:4] == ("log", "log")
    assert axes["components_vs_step"][0][0] == "training step"
    # The rank distribution drawn at the last step is the accumulator's P.
    last = max((r for r in results if r["model"]["step"]), key=lambda r: r["model"]["step"])
    state = torch.load(Path(last["_path"]).with_name("accumulator.pt"))
    count = state["stats"][0].numpy()
    want = count[count > 0] / count.sum()
    drawn = axes["rank_distribution"][0][4][-1]
    np.testing.assert_allclose(drawn, want, rtol=1e-12)


def test_cli_and_nothing_to_plot(results_dir, tmp_path, capsys):
    assert main(["plot", str(results_dir), "--output-dir", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "p_vs_q.pdf").exists()
    one = next(results_dir.glob("size48/*/results.json"))
    assert main(["plot", str(one), "--output-dir", str(tmp_path / "g")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert main(["fit", str(results_dir)]) == 0


def with_accumulator(results_dir, tmp_path, write):
    """A copy of the results whose last checkpoint's accumulator.pt is replaced by write(path)."""
    import shutil
    shutil.copytree(results_dir, tmp_path / "results")
    path = next((tmp_path / "results").glob("checkpoint-1000/*/accumulator.pt"))
    write(path)
    return tmp_path / "results", path


def test_a_small_file_claiming_a_huge_vocabulary_is_refused_before_any_allocation(results_dir, tmp_path):
    # 2e8 columns would be 9.6 GB of int64 state; the file holds a few bytes. The command runs
    # with its address space capped at 2 GiB above what its imports took: allocating the
    # claimed state would fail there, not succeed slowly.
    import subprocess
    import sys
    claim = {"format": 1, "vocab_size": 200_000_000, "stats": torch.zeros(6, 4, dtype=torch.int64),
             "n_tied": torch.tensor(0), "n_skipped": torch.tensor(0), "ties_known": True}
    folder, path = with_accumulator(results_dir, tmp_path, lambda p: torch.save(claim, p))
    assert path.stat().st_size < 4096
    code = ("import resource, sys, time\n"
            "import torch, matplotlib.pyplot\n"
            "from rankops.cli import main\n"
            "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 2 ** 31, resource.RLIM_INFINITY))\n"
            "t0 = time.monotonic()\n"
            "rc = main(['plot', sys.argv[1], '--output-dir', sys.argv[2]])\n"
            "print(f'elapsed {time.monotonic() - t0:.1f}')\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "figures")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"rankops plot: error: {path}: "), r.stderr
    assert "claims vocab_size 200000000 but its stats are a torch.int64 tensor of shape (6, 4)" in r.stderr
    assert float(r.stdout.split()[-1]) < 60


@pytest.mark.parametrize("form, message", [
    ("truncated", "cannot be read as an accumulator file"),
    ("not a dict", "not a dict"),
    ("a negative count", "negative strict count"),
    ("a hostile pickle", "refused unread"),
])
def test_a_bad_accumulator_file_is_one_line_and_exit_2(results_dir, tmp_path, capsys, form, message):
    import os

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    def write(path):
        if form == "truncated":
            path.write_bytes(path.read_bytes()[:100])
        elif form == "not a dict":
            torch.save(torch.zeros(3), path)
        elif form == "a negative count":
            state = torch.load(path)
            state["stats"][0, 0] = -1
            torch.save(state, path)
        else:
            torch.save({"stats": Hostile()}, path)
    folder, path = with_accumulator(results_dir, tmp_path, write)
    assert main(["plot", str(folder), "--output-dir", str(tmp_path / "figures")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rankops plot: error: {path}: ") and message in err, err
