"""`rankops plot`: the paper's figures from `rankops eval` results files, as PNG and PDF.

    components_vs_step   CE, EE, SA, Conf against training step, one panel per corpus (checkpoint series)
    rank_distribution    P(k) against rank k + 1 at several steps, log-log (from accumulator.pt)
    p_vs_q               P(k) against Q(k) at several steps, log-log, with the diagonal P = Q
    scaling              CE, EE, SA, |Conf| against non-embedding parameters, log-log, with fitted lines
    shares               |EE|, |SA|, |Conf| as shares of their sum against non-embedding parameters
Each is written only when the results hold what it needs (a checkpoint series for the first
three, two or more model sizes for the last two).
"""
import functools
import io
from pathlib import Path
from typing import Dict, List

import numpy as np

from rankops.atomic import write_atomic
from rankops.eval.checkpoint import read_accumulator_decomposition
from rankops.fit import fit_power_law
from rankops.scaling import COMPONENTS, final_points, run_of

LABELS = {"CE": "cross-entropy CE (nats/token)", "EE": "error-entropy EE (nats)",
          "SA": "self-alignment SA (nats)", "Conf": "confidence Conf (nats)"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str) -> List[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight")
        write_atomic(path, buf.getvalue())
        paths.append(path)
    _plt().close(fig)
    return paths


def _series(results) -> Dict[tuple, list]:
    """(model source without step, corpus) -> results with a step, sorted by step."""
    series = {}
    for r in results:
        if r["model"].get("step") is None:
            continue
        series.setdefault((run_of(r), r["corpus"]["name"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["model"]["step"]) for k, v in series.items() if len(v) >= 2}


def _decomposition_of(result):
    return _saved_decomposition(result["_path"])


@functools.lru_cache(maxsize=None)
def _saved_decomposition(results_path: str):
    """The decomposition from the accumulator saved beside a results file (read once per
    plot_all call: two figures use the same steps). The file may come from anyone: its sizes
    are checked against the tensors it holds before anything is allocated, then its invariants
    (a ValueError naming the file otherwise), and the work goes by the ranks observed."""
    return read_accumulator_decomposition(Path(results_path).with_name("accumulator.pt"))


def components_vs_step(series, out_dir):
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, ((run, corpus), rs) in zip(axes[0], sorted(series.items())):
        steps = [r["model"]["step"] for r in rs]
        for short, key, _ in COMPONENTS:
            ax.plot(steps, [r["decomposition"][key] for r in rs], marker="o", label=short)
        ax.set_xlabel("training step")
        ax.set_ylabel("nats per token")
        ax.set_title(f"{Path(run).name or run} on {corpus}")
        ax.axhline(0, color="0.7", lw=0.8)
        ax.legend()
    return _save(fig, out_dir, "components_vs_step")


def _pick_steps(rs, n=4):
    idx = np.unique(np.linspace(0, len(rs) - 1, min(n, len(rs))).round().astype(int))
    return [rs[i] for i in idx]


def rank_distribution(series, out_dir):
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, ((run, corpus), rs) in zip(axes[0], sorted(series.items())):
        for r in _pick_steps(rs):
            d = _decomposition_of(r)
            ax.loglog(d.ranks + 1, d.P, marker=".", ls="", label=f"step {r['model']['step']}")
        ax.set_xlabel("rank of the correct token + 1")
        ax.set_ylabel("P(rank): share of tokens")
        ax.set_title(f"rank distribution, {corpus}")
        ax.legend()
    return _save(fig, out_dir, "rank_distribution")


def p_vs_q(series, out_dir):
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
    for ax, ((run, corpus), rs) in zip(axes[0], sorted(series.items())):
        lo = 1.0
        for r in _pick_steps(rs):
            d = _decomposition_of(r)
            ax.loglog(d.Q, d.P, marker=".", ls="", label=f"step {r['model']['step']}")
            lo = min(lo, d.P.min(), d.Q.min())
        ax.plot([lo, 1], [lo, 1], color="0.5", lw=0.8, label="P = Q")
        ax.set_xlabel("Q(rank): normalised geometric-mean probability")
        ax.set_ylabel("P(rank): share of tokens")
        ax.set_title(f"self-alignment, {corpus}")
        ax.legend()
    return _save(fig, out_dir, "p_vs_q")


def _by_corpus_sizes(results):
    groups = {}
    for r in final_points(results):
        groups.setdefault(r["corpus"]["name"], []).append(r)
    return {c: sorted(rs, key=lambda r: r["model"]["n_parameters"]["non_embedding"])
            for c, rs in groups.items() if len({r["model"]["n_parameters"]["non_embedding"] for r in rs}) >= 2}


def scaling(groups, out_dir):
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for corpus, rs in sorted(groups.items()):
        x = np.array([r["model"]["n_parameters"]["non_embedding"] for r in rs], dtype=float)
        for ax, (short, key, log_abs) in zip(axes, COMPONENTS):
            y = np.array([r["decomposition"][key] for r in rs])
            f = fit_power_law(x, y, name=short, log_abs=log_abs)
            line = ax.loglog(x, np.abs(y), marker="o", ls="", label=f"{corpus}")[0]
            grid = np.geomspace(x.min(), x.max(), 50)
            ax.loglog(grid, np.abs(f.predict(grid)), color=line.get_color(), lw=1,
                      label=f"alpha={f.alpha:.3f}, R^2={f.r_squared:.3f}")
    for ax, (short, _, log_abs) in zip(axes, COMPONENTS):
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(("|" + short + "|" if log_abs else short) + " (nats)")
        ax.set_title(LABELS[short])
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "scaling")


def shares(groups, out_dir):
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (corpus, rs) in zip(axes[0], sorted(groups.items())):
        x = [r["model"]["n_parameters"]["non_embedding"] for r in rs]
        for name, key in (("EE", "error_entropy"), ("SA", "self_alignment"), ("Conf", "confidence")):
            ax.semilogx(x, [r["decomposition"]["magnitude_shares"][key] for r in rs], marker="o", label=name)
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel("share of |EE| + |SA| + |Conf|")
        ax.set_ylim(0, 1)
        ax.set_title(f"component shares, {corpus}")
        ax.legend()
    return _save(fig, out_dir, "shares")


def plot_all(results: List[dict], out_dir: str) -> List[Path]:
    """Writes every figure the results support; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _saved_decomposition.cache_clear()  # accumulators are read once per call, never stale
    written = []
    series = _series(results)
    if series:
        written += components_vs_step(series, out)
        written += rank_distribution(series, out)
        written += p_vs_q(series, out)
    groups = _by_corpus_sizes(results)
    if groups:
        written += scaling(groups, out)
        written += shares(groups, out)
    if not written:
        raise ValueError("the results hold neither a checkpoint series (two or more steps of one "
                         "run) nor two or more model sizes on one corpus: nothing to plot")
    return written
