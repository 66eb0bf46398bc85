"""`rankops plot`: the paper's figures from `rankops eval` results files, as PNG and PDF.

    components_vs_step   CE, EE, SA, Conf against training step: one panel per component and
                         corpus, one line per run (checkpoint series only)
    rank_distribution    P(k) against rank k + 1, log-log, one panel per model and corpus, a few
                         steps each (from the accumulator.pt saved beside each results file)
    p_vs_q               P(k) against Q(k), log-log, with the diagonal P = Q, panels as above
    scaling              CE, EE, SA, |Conf| against non-embedding parameters, log-log, with fitted
                         lines (two or more model sizes on one corpus)
    shares               |EE|, |SA|, |Conf| as shares of their sum: against model size where a
                         corpus has several sizes, as bars where it has one
One model on one corpus is enough for rank_distribution, p_vs_q and shares.

Layout rules (docs/DESIGN.md): panels go in a grid of at most MAX_COLS columns, each corpus
starting a new row, models ordered by size (rankops.scaling.size_key: parameter count, then a
natural sort of names); every figure stays under MAX_WIDTH_PX at DPI; each term has its own
axis; axes are clipped to the data they show; log axes carry at least three tick labels.
"""
import functools
import io
import math
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np

from rankops.atomic import write_atomic
from rankops.eval.checkpoint import read_accumulator_decomposition
from rankops.fit import RankopsFitWarning, fit_power_law
from rankops.scaling import COMPONENTS, final_points, run_of, size_key

DPI = 150
MAX_COLS = 4
PANEL_W, PANEL_H = 3.6, 2.9  # inches: MAX_COLS panels are 14.4 in, 2160 px at DPI
MAX_WIDTH_PX = 2400
FORMATS = ("png", "pdf")

LABELS = {"CE": "cross-entropy CE", "EE": "error-entropy EE",
          "SA": "self-alignment SA", "Conf": "confidence Conf"}

# What each figure needs from the results, for `rankops plot` to say why one was not drawn.
NEEDS = {
    "components_vs_step": "a checkpoint series (two or more steps of one run on one corpus)",
    "rank_distribution": "an accumulator.pt beside a results file",
    "p_vs_q": "an accumulator.pt beside a results file",
    "scaling": "two or more model sizes on one corpus",
    "shares": "one results file",
}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str) -> List[Path]:
    paths = []
    for ext in FORMATS:
        path = out_dir / f"{name}.{ext}"
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=DPI, bbox_inches="tight")
        write_atomic(path, buf.getvalue())
        paths.append(path)
    _plt().close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Grouping and order


def _runs(results) -> Dict[tuple, list]:
    """(training run, corpus) -> its results, by step. A model without a step is a run of one."""
    runs = {}
    for r in results:
        runs.setdefault((run_of(r), r["corpus"]["name"]), {})[r["model"].get("step")] = r
    def step(r):
        return -1 if r["model"].get("step") is None else r["model"]["step"]
    return {k: sorted(v.values(), key=step) for k, v in runs.items()}


def _ordered(runs: Dict[tuple, list]) -> List[tuple]:
    """The runs' keys by corpus, then by the size of the run's final model."""
    return sorted(runs, key=lambda k: (k[1], size_key(runs[k][-1])))


def _run_name(run: str, rs: list) -> str:
    if rs[-1]["model"].get("step") is None:
        return rs[-1]["model"].get("name") or Path(run).name or run
    return Path(run).name or run


def _fmt_count(n: float) -> str:
    """55536 -> 56k, 4016896 -> 4.0M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            v = n / scale
            text = f"{v:.1f}" if v < 10 else f"{v:.0f}"
            return (text[:-2] if text.endswith(".0") else text) + suffix
    return f"{n:g}"


def _fmt_value(v: float) -> str:
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        text = f"{v:.3g}"
        return f"{v:.0f}" if "e" in text else text
    e = math.floor(math.log10(abs(v)))
    m = v / 10 ** e
    if abs(m - round(m)) < 1e-9 and round(m) == 1:
        return f"$10^{{{e}}}$"
    return f"${m:.2g}\\times10^{{{e}}}$"


def _fmt_power(v: float) -> str:
    """A power of ten: 10^-5 ... 0.1 as 10^k, 1 and above as plain numbers."""
    if v <= 0 or v >= 1:
        return _fmt_value(v)
    return f"$10^{{{round(math.log10(v))}}}$"


# ---------------------------------------------------------------------------------------------
# Axes


def _grid(groups: List[list], panel_w: float = PANEL_W, panel_h: float = PANEL_H,
          legend_rows: int = 0, max_cols: int = MAX_COLS):
    """A figure with one panel per item: at most max_cols a row, each group (a corpus) starting
    a new row unless all fit in one. Returns the figure and [(item, axes)] in order."""
    plt = _plt()
    items = [it for g in groups for it in g]
    if len(items) <= max_cols:
        rows = [items]
    else:
        rows = [g[i:i + max_cols] for g in groups for i in range(0, len(g), max_cols)]
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False, layout="constrained",
                             figsize=(panel_w * ncols, panel_h * len(rows) + 0.25 * legend_rows))
    placed = []
    for i, row in enumerate(rows):
        for j in range(ncols):
            if j < len(row):
                placed.append((row[j], axes[i][j]))
            else:
                axes[i][j].remove()
    return fig, placed


def _log_limits(values, pad: float = 0.04):
    """(lo, hi) around the positive values, padded by a share of their span in log space."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = float(v.min()), float(v.max())
    margin = max(pad * math.log(hi / lo), math.log(1.03))
    return lo * math.exp(-margin), hi * math.exp(margin)


def _log_ticks(ax, count_axis: str = "") -> None:
    """At least three labelled ticks on each log axis of ax, whatever its span (call after the
    limits are set). count_axis ("x" or "y") labels that axis as counts: 50k, 1M."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
    for name, axis, (lo, hi) in (("x", ax.xaxis, ax.get_xlim()), ("y", ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        fmt = _fmt_count if name == count_axis else _fmt_value
        decades = math.log10(hi / lo)
        if decades >= 3:  # powers of ten, about five labelled, all below 1 as 10^k
            axis.set_major_locator(LogLocator(base=10, numticks=6))
            if name != count_axis:
                fmt = _fmt_power
            axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 0.1, numticks=12))
        else:  # 1-2-5 steps, powers of ten, finer steps, plain numbers: the first with 3 to 8 labels
            axis.set_minor_locator(NullLocator())
            for locator in (LogLocator(base=10, subs=(1.0, 2.0, 5.0)),
                            LogLocator(base=10, subs=(1.0,)),
                            LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)),
                            MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3)):
                ticks = [t for t in locator.tick_values(lo, hi) if lo <= t <= hi]
                if 3 <= len(ticks) <= 8:
                    break
            axis.set_major_locator(locator)
        axis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


# ---------------------------------------------------------------------------------------------
# Figures


def components_vs_step(series, out_dir):
    """One panel per (corpus, component), one line per run, runs coloured by size."""
    plt = _plt()
    corpora = sorted({c for _, c in series})
    runs = sorted({run for run, _ in series},
                  key=lambda run: min(size_key(rs[-1]) for (r_, _), rs in series.items() if r_ == run))
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(runs)))
    fig, placed = _grid([[(c, comp) for comp in COMPONENTS] for c in corpora],
                        legend_rows=math.ceil(len(runs) / MAX_COLS))
    handles = {}
    for (corpus, (short, key, _)), ax in placed:
        for colour, run in zip(colours, runs):
            rs = series.get((run, corpus))
            if not rs:
                continue
            line, = ax.plot([r["model"]["step"] for r in rs], [r["decomposition"][key] for r in rs],
                            marker="o", ms=3.5, color=colour)
            n = rs[-1]["model"]["n_parameters"]["non_embedding"]
            handles.setdefault(run, (line, f"{_run_name(run, rs)} ({_fmt_count(n)} params)"))
        ax.set_xlabel("training step")
        ax.set_ylabel("nats per token")
        ax.set_title(f"{LABELS[short]}, {corpus}", fontsize=10)
    order = [handles[r] for r in runs if r in handles]
    fig.legend([h for h, _ in order], [lab for _, lab in order], loc="outside lower center",
               ncol=min(len(order), MAX_COLS), fontsize=8, frameon=False)
    return _save(fig, out_dir, "components_vs_step")


def _pick_steps(rs, n=4):
    idx = np.unique(np.linspace(0, len(rs) - 1, min(n, len(rs))).round().astype(int))
    return [rs[i] for i in idx]


def _panels_with_accumulators(runs):
    """[(key, picked results)] by corpus then size, keeping results with an accumulator.pt."""
    out = []
    for key in _ordered(runs):
        picked = [r for r in _pick_steps([r for r in runs[key]
                                          if Path(r["_path"]).with_name("accumulator.pt").exists()])]
        if picked:
            out.append((key, picked))
    return out


def _by_corpus(panels):
    groups = {}
    for item in panels:
        groups.setdefault(item[0][1], []).append(item)
    return [groups[c] for c in sorted(groups)]


def _step_label(r):
    step = r["model"].get("step")
    return None if step is None else f"step {step}"


def _panel_title(run, rs, corpus):
    n = rs[-1]["model"]["n_parameters"]["non_embedding"]
    return f"{_run_name(run, rs)} ({_fmt_count(n)} params), {corpus}"


def _legends(fig, placed, panels):
    """One legend for the figure when every panel shows the same steps, else one per panel."""
    labels = [tuple(_step_label(r) for r in picked) for _, picked in panels]
    if not any(lab for ls in labels for lab in ls) and not placed[0][1].get_legend_handles_labels()[1]:
        return
    if len(set(labels)) == 1:
        handles, names = placed[0][1].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8,
                   frameon=False, markerscale=3)
    else:
        for _, ax in placed:
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=7, markerscale=3, loc="best")


def rank_distribution(panels, out_dir):
    fig, placed = _grid(_by_corpus(panels), legend_rows=1)
    for ((run, corpus), picked), ax in placed:
        xs, ys = [], []
        for r in picked:
            d = _decomposition_of(r)
            ax.loglog(d.ranks + 1, d.P, marker=".", ms=2.5, ls="", alpha=0.7, label=_step_label(r))
            xs.append(d.ranks + 1)
            ys.append(d.P)
        ax.set_xlim(*_log_limits(np.concatenate(xs)))
        ax.set_ylim(*_log_limits(np.concatenate(ys)))
        _log_ticks(ax)
        ax.set_xlabel("rank of the correct token + 1")
        ax.set_ylabel("P(rank): share of tokens")
        ax.set_title(_panel_title(run, picked, corpus), fontsize=9)
    _legends(fig, placed, [p for p, _ in placed])
    return _save(fig, out_dir, "rank_distribution")


def p_vs_q(panels, out_dir):
    fig, placed = _grid(_by_corpus(panels), legend_rows=1)
    for ((run, corpus), picked), ax in placed:
        qs, ps = [], []
        for r in picked:
            d = _decomposition_of(r)
            ax.loglog(d.Q, d.P, marker=".", ms=2.5, ls="", alpha=0.7, label=_step_label(r))
            qs.append(d.Q)
            ps.append(d.P)
        xlo, xhi = _log_limits(np.concatenate(qs))
        ylo, yhi = _log_limits(np.concatenate(ps))
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(ylo, yhi)
        lo, hi = max(xlo, ylo), min(xhi, yhi)  # the diagonal only where both axes show it
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], color="0.3", lw=0.8, ls="--", label="P = Q")
        _log_ticks(ax)
        ax.set_xlabel("Q(rank): normalised geometric-mean prob.")
        ax.set_ylabel("P(rank): share of tokens")
        ax.set_title(_panel_title(run, picked, corpus), fontsize=9)
    _legends(fig, placed, [p for p, _ in placed])
    return _save(fig, out_dir, "p_vs_q")


def _decomposition_of(result):
    return _saved_decomposition(result["_path"])


@functools.lru_cache(maxsize=None)
def _saved_decomposition(results_path: str):
    """The decomposition from the accumulator saved beside a results file (read once per
    plot_all call: two figures use the same steps). The file may come from anyone: its sizes
    are checked against the tensors it holds before anything is allocated, then its invariants
    (a ValueError naming the file otherwise), and the work goes by the ranks observed."""
    return read_accumulator_decomposition(Path(results_path).with_name("accumulator.pt"))


def _by_corpus_sizes(results, min_sizes: int = 2):
    """corpus -> its final points by size, for corpora with at least min_sizes model sizes."""
    groups = {}
    for r in final_points(results):
        groups.setdefault(r["corpus"]["name"], []).append(r)
    return {c: sorted(rs, key=size_key) for c, rs in groups.items()
            if len({r["model"]["n_parameters"]["non_embedding"] for r in rs}) >= min_sizes}


def scaling(groups, out_dir):
    """One panel per component (2 x 2), one colour per corpus; legends below the axes."""
    from matplotlib.legend_handler import HandlerTuple
    fig, placed = _grid([list(COMPONENTS[:2]), list(COMPONENTS[2:])], panel_w=4.4, panel_h=3.4,
                        max_cols=2)
    colours = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    for (short, key, log_abs), ax in placed:
        xs, ys, handles, names = [], [], [], []
        for i, (corpus, rs) in enumerate(sorted(groups.items())):
            colour = colours[i % len(colours)]
            x = np.array([r["model"]["n_parameters"]["non_embedding"] for r in rs], dtype=float)
            y = np.array([r["decomposition"][key] for r in rs], dtype=float)
            dots, = ax.loglog(x, np.abs(y), marker="o", ms=4, ls="", color=colour)
            xs.append(x)
            ys.append(np.abs(y))
            try:
                with warnings.catch_warnings():  # few points: the legend gives n; `rankops fit` warns
                    warnings.simplefilter("ignore", RankopsFitWarning)
                    f = fit_power_law(x, y, name=short, log_abs=log_abs)
            except ValueError:  # a zero term: nothing to fit in log space; the points stay
                handles.append(dots)
                names.append(f"{corpus}: no fit")
                continue
            grid = np.geomspace(x.min(), x.max(), 50)
            fitted, = ax.loglog(grid, np.abs(f.predict(grid)), color=colour, lw=1)
            ys.append(np.abs(f.predict(grid)))
            handles.append((dots, fitted))
            names.append(f"{corpus}: α = {f.alpha:.3f}, R$^2$ = {f.r_squared:.2f}, n = {len(x)}")
        ax.set_xlim(*_log_limits(np.concatenate(xs)))
        ax.set_ylim(*_log_limits(np.concatenate(ys), pad=0.08))
        _log_ticks(ax, count_axis="x")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(("|" + short + "|" if log_abs else short) + " (nats per token)")
        ax.set_title(LABELS[short] + (" (magnitude)" if log_abs else ""), fontsize=10)
        ax.legend(handles, names, handler_map={tuple: HandlerTuple(ndivide=None)}, fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, out_dir, "scaling")


SHARES = (("EE", "error_entropy"), ("SA", "self_alignment"), ("Conf", "confidence"))


def _shares_of(r):
    m = np.array([abs(float(r["decomposition"][key])) for _, key in SHARES])
    return m / m.sum() if m.sum() > 0 else np.full(3, np.nan)


def shares(results, out_dir):
    """One panel per corpus: shares against model size (log-log, so SA and Conf are read as
    well as EE) where the corpus has several sizes, else bars labelled with their values."""
    by_corpus = _by_corpus_sizes(results, min_sizes=1)
    fig, placed = _grid([[c] for c in sorted(by_corpus)])
    colours = _plt().rcParams["axes.prop_cycle"].by_key()["color"]
    for corpus, ax in placed:
        rs = by_corpus[corpus]
        values = np.array([_shares_of(r) for r in rs])  # [models, 3]
        x = np.array([r["model"]["n_parameters"]["non_embedding"] for r in rs], dtype=float)
        if len(set(x)) >= 2:
            for j, (name, _) in enumerate(SHARES):
                ax.loglog(x, values[:, j], marker="o", ms=4, label=name, color=colours[j])
            ax.set_xlim(*_log_limits(x))
            ax.set_ylim(*_log_limits(values, pad=0.08))
            _log_ticks(ax, count_axis="x")
            ax.set_xlabel("non-embedding parameters")
            ax.set_ylabel("share of |EE| + |SA| + |Conf|")
            ax.set_title(f"component shares, {corpus}", fontsize=10)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
                      frameon=False)
        else:
            width = 0.8 / len(SHARES)
            pos = np.arange(len(rs))
            for j, (name, _) in enumerate(SHARES):
                bars = ax.bar(pos + (j - 1) * width, values[:, j], width, label=name, color=colours[j])
                ax.bar_label(bars, labels=[f"{v:.1%}" for v in values[:, j]], fontsize=8, padding=2)
            ax.set_xticks(pos, [f"{r['model'].get('name') or r['model']['source']}\n"
                                f"({_fmt_count(r['model']['n_parameters']['non_embedding'])} params)"
                                for r in rs], fontsize=8)
            ax.set_ylim(0, 1.12)
            ax.set_ylabel("share of |EE| + |SA| + |Conf|")
            ax.set_title(f"component shares, {corpus}", fontsize=10)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3,
                      frameon=False)
    return _save(fig, out_dir, "shares")


def plot_all(results: List[dict], out_dir: str, figures=None) -> List[Path]:
    """Writes every figure the results support; returns the files written (NEEDS says what each
    figure needs). figures: the names (NEEDS' keys) to consider, default all of them; the
    others are neither drawn nor touched in out_dir."""
    if figures is None:
        wanted = set(NEEDS)
    else:
        wanted = {figures} if isinstance(figures, str) else set(figures)
        unknown = sorted(str(f) for f in wanted - set(NEEDS))
        if unknown or not wanted:
            raise ValueError(f"figures: unknown {', '.join(unknown) or 'empty selection'}; "
                             f"choose from {', '.join(NEEDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _saved_decomposition.cache_clear()  # accumulators are read once per call, never stale
    written = []
    runs = _runs(results)
    series = {k: v for k, v in runs.items() if len(v) >= 2}
    if series and "components_vs_step" in wanted:
        written += components_vs_step(series, out)
    panels = _panels_with_accumulators(runs) if wanted & {"rank_distribution", "p_vs_q"} else None
    if panels and "rank_distribution" in wanted:
        written += rank_distribution(panels, out)
    if panels and "p_vs_q" in wanted:
        written += p_vs_q(panels, out)
    groups = _by_corpus_sizes(results) if "scaling" in wanted else None
    if groups:
        written += scaling(groups, out)
    if results and "shares" in wanted:
        written += shares(results, out)
    if not written:
        raise ValueError("no results to plot")
    return written
