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
    for p in written:
        if p.suffix == ".png":
            w, h = png_size(p)
            assert w <= 2400 and h <= 2400, (p.name, w, h)


def test_a_selection_of_figures_draws_those_alone_and_leaves_the_rest(results_dir, tmp_path):
    results = load_results([str(results_dir)])
    (tmp_path / "scaling.png").write_bytes(b"left alone")
    written = plot_all(results, str(tmp_path), figures=("p_vs_q", "shares"))
    assert sorted(p.name for p in written) == sorted(f"{f}.{e}" for f in ("p_vs_q", "shares") for e in ("png", "pdf"))
    assert (tmp_path / "scaling.png").read_bytes() == b"left alone"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in written] + ["scaling.png"])
    # one name alone; the same bytes as the whole set draws
    one = plot_all(results, str(tmp_path / "one"), figures="shares")
    every = plot_all(results, str(tmp_path / "every"))
    assert [p.name for p in one] == ["shares.png", "shares.pdf"]
    assert (tmp_path / "one" / "shares.png").read_bytes() == (tmp_path / "every" / "shares.png").read_bytes()
    for bad in (("scaling", "histogram"), ()):
        with pytest.raises(ValueError, match="figures") as err:
            plot_all(results, str(tmp_path / "bad"), figures=bad)
        assert "histogram" in str(err.value) or "empty" in str(err.value)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


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


def png_size(path):
    """(width, height) in pixels, from the PNG header."""
    import struct
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_cli(results_dir, tmp_path, capsys):
    assert main(["plot", str(results_dir), "--output-dir", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "p_vs_q.pdf").exists()
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / "f" / f"{f}.{e}") for f in FIGURES for e in ("png", "pdf")]
    assert f"5 figures (PNG and PDF) in {tmp_path / 'f'}" in err and "not drawn" not in err
    assert main(["fit", str(results_dir)]) == 0


def test_one_model_on_one_corpus_gets_its_figures_and_its_shares(results_dir, tmp_path, capsys):
    # The main job's output: one model, no checkpoint series, one corpus.
    one = next(results_dir.glob("size48/*/results.json"))
    assert main(["plot", str(one), "--output-dir", str(tmp_path / "g")]) == 0
    out, err = capsys.readouterr()
    drawn = ("rank_distribution", "p_vs_q", "shares")
    assert out.split() == [str(tmp_path / "g" / f"{f}.{e}") for f in drawn for e in ("png", "pdf")]
    assert f"3 figures (PNG and PDF) in {tmp_path / 'g'}" in err
    assert "components_vs_step not drawn: it needs a checkpoint series" in err
    assert "scaling not drawn: it needs two or more model sizes on one corpus" in err
    for f in drawn:
        w, h = png_size(tmp_path / "g" / f"{f}.png")
        assert 300 < w <= 900 and 250 < h <= 900, (f, w, h)  # one panel
    assert main(["fit", str(one)]) == 0
    out = capsys.readouterr().out
    r = json.loads(one.read_text())["decomposition"]
    row = next(line for line in out.splitlines() if line.startswith("| size48 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:8] == [f"{r[k]:.4f}" for k in ("cross_entropy", "error_entropy", "self_alignment", "confidence")]
    assert cells[8] == f"{r['error_entropy'] / r['cross_entropy']:.3f}"
    assert "No power law fitted" in out and "needs several model sizes" in out
    assert "Scaling difference" not in out


def captured_figures(monkeypatch, render=False):
    """A record of each figure's panels, (title, row, column) in order; the figure is rendered
    as PNG alone with render=True, else not at all."""
    import rankops.plot
    seen, original = {}, rankops.plot._save

    def recording_save(fig, out_dir, name):
        seen[name] = [(ax.get_title(), ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start)
                      for ax in fig.axes]
        for ax in fig.axes:  # every log axis labels at least three ticks inside its limits
            for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
                if axis.get_scale() == "log":
                    ticks = [t for t in axis.get_major_locator()() if lo <= t <= hi]
                    seen.setdefault("log ticks", []).append((name, ax.get_title(), len(ticks)))
        if render:
            return original(fig, out_dir, name)
        rankops.plot._plt().close(fig)
        return [Path(out_dir) / f"{name}.png"]

    monkeypatch.setattr(rankops.plot, "_save", recording_save)
    monkeypatch.setattr(rankops.plot, "FORMATS", ("png",))
    return seen


def test_panels_are_ordered_by_size_then_by_natural_name(results_dir, tmp_path, monkeypatch):
    seen = captured_figures(monkeypatch)
    results = load_results([str(results_dir)])
    models = {r["model"]["name"]: r for r in results if r["model"]["step"] is None}
    # by size: the checkpoint run (width 32) < size48 < size64, whatever the names say
    models["size48"]["model"]["name"], models["size64"]["model"]["name"] = "zz-small", "aa-large"
    plot_all(results, str(tmp_path))
    titles = [t.split(" (")[0] for t, _, _ in seen["rank_distribution"]]
    assert titles == ["run", "zz-small", "aa-large"]
    assert [t.split(" (")[0] for t, _, _ in seen["p_vs_q"]] == titles
    # equal sizes fall back to a natural sort of names: d48 before d128
    for name, r in (("d128", models["size48"]), ("d48", models["size64"])):
        r["model"]["name"] = name
        r["model"]["n_parameters"]["non_embedding"] = 10 ** 9
    plot_all(results, str(tmp_path))
    assert [t.split(" (")[0] for t, _, _ in seen["rank_distribution"]] == ["run", "d48", "d128"]


def many_models(results_dir):
    """14 single-model results, 7 sizes on each of 2 corpora, named d48 ... d256 and listed in
    an order that is neither by size nor by name; they share the fixture's accumulators."""
    import copy
    base = [r for r in load_results([str(results_dir)]) if r["model"]["step"] is None]
    out = []
    for corpus in ("words", "other"):
        for i, width in enumerate((160, 48, 256, 96, 128, 64, 192)):
            r = copy.deepcopy(base[i % 2])
            r["model"].update(name=f"d{width}", source=f"/models/d{width}", family="test")
            r["model"]["n_parameters"]["non_embedding"] = width ** 2 * 100
            r["corpus"]["name"] = corpus
            out.append(r)
    return out


def test_many_panels_fill_a_grid_no_wider_than_2400_px(results_dir, tmp_path, monkeypatch):
    from rankops.plot import MAX_COLS, MAX_WIDTH_PX
    assert MAX_COLS == 4 and MAX_WIDTH_PX <= 2400
    seen = captured_figures(monkeypatch, render=True)
    written = plot_all(many_models(results_dir), str(tmp_path))
    sizes = ["d48", "d64", "d96", "d128", "d160", "d192", "d256"]
    for name in ("rank_distribution", "p_vs_q"):
        panels = seen[name]
        assert [(t.split(" (")[0], t.rsplit(", ", 1)[1]) for t, _, _ in panels] == \
            [(s, c) for c in ("other", "words") for s in sizes]
        # at most MAX_COLS a row, and each corpus starts a row of its own
        assert [(row, col) for _, row, col in panels] == \
            [(r + 2 * k, c) for k in range(2) for r, n in ((0, 4), (1, 3)) for c in range(n)]
    assert [t for t, _, _ in seen["shares"]] == ["component shares, other", "component shares, words"]
    assert {name for name, _, _ in seen["log ticks"]} == {"rank_distribution", "p_vs_q", "scaling", "shares"}
    assert all(3 <= n <= 12 for _, _, n in seen["log ticks"]), seen["log ticks"]
    assert sorted(p.name for p in written) == ["p_vs_q.png", "rank_distribution.png", "scaling.png", "shares.png"]
    for p in written:  # rendered as `rankops plot` renders them: every image within the bound
        w, h = png_size(p)
        assert 400 < w <= MAX_WIDTH_PX and h <= MAX_WIDTH_PX, (p.name, w, h)


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
