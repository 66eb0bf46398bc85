"""`rankops fit`: the paper's scaling tables from `rankops eval` results files.

Each model contributes one point per corpus, its final checkpoint (largest step); X is its
non-embedding parameter count. Within each group (one model family on one corpus, and all
families together on that corpus) CE, EE, SA and Conf are fitted as log M = a + b log X
(rankops.fit.fit_power_law). Conf can be negative, so it is fitted as log|Conf|, and the tables
say so. Groups always stay within one corpus: fitting across corpora would mix distributions.
"""
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterable, List

from rankops.fit import RankopsFitWarning, fit_power_law, scaling_difference

COMPONENTS = (("CE", "cross_entropy", False), ("EE", "error_entropy", False),
              ("SA", "self_alignment", False), ("Conf", "confidence", True))


def load_results(paths: Iterable[str]) -> List[dict]:
    """Results dicts from files and folders (searched for results.json)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("results.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"results path {p} does not exist")
    if not files:
        raise ValueError("no results files found")
    results = []
    for f in files:
        try:
            r = json.loads(f.read_text())
            r["decomposition"]["cross_entropy"], r["model"]["n_parameters"]["non_embedding"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{f} is not a rankops eval results file: {exc}") from exc
        r["_path"] = str(f)
        results.append(r)
    return results


def run_of(result: dict) -> str:
    """The training run a result belongs to: checkpoints (results with a step) of one run sit
    in one folder; a model without a step is a run of its own."""
    source = result["model"]["source"]
    return str(Path(source).parent) if result["model"].get("step") is not None else source


def natural_key(name: str) -> tuple:
    """A sort key that orders the digits in a name as numbers: d48 before d128."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(name)) if part)


def size_key(result: dict) -> tuple:
    """Orders results by model size: the non-embedding parameter count the results record,
    then (equal or missing counts) a natural sort of the model's name, then its step."""
    n = result["model"].get("n_parameters", {}).get("non_embedding")
    size = n if isinstance(n, (int, float)) and math.isfinite(n) else math.inf
    step = result["model"].get("step")
    return (size, natural_key(result["model"].get("name", "")), -1 if step is None else step)


def final_points(results: List[dict]) -> List[dict]:
    """One result per (training run, corpus): the one with the largest step."""
    best = {}
    for r in results:
        key = (run_of(r), r["corpus"]["name"])
        step = r["model"].get("step")
        rank = -1 if step is None else step
        if key not in best or rank > best[key][0]:
            best[key] = (rank, r)
    return [r for _, r in best.values()]


def model_rows(results: List[dict]) -> List[dict]:
    """One row per model and corpus (the final checkpoint of a run), by corpus then size: the
    four components and their ratios to CE. What one model on one corpus can report."""
    rows = []
    for r in sorted(final_points(results), key=lambda r: (r["corpus"]["name"], size_key(r))):
        d = r["decomposition"]
        values = {short: float(d[key]) for short, key, _ in COMPONENTS}
        ce = values["CE"]
        rows.append({
            "model": r["model"].get("name") or r["model"]["source"], "step": r["model"].get("step"),
            "family": r["model"].get("family"), "corpus": r["corpus"]["name"],
            "non_embedding_parameters": r["model"]["n_parameters"]["non_embedding"],
            **values,
            "ratio_to_CE": {k: (values[k] / ce if ce else float("nan")) for k in ("EE", "SA", "Conf")},
        })
    return rows


def models_markdown(rows: List[dict]) -> str:
    out = ["Per model and corpus, final checkpoint (nats per token; CE = EE + SA - Conf)", "",
           "| model | step | corpus | non-embedding params | CE | EE | SA | Conf | EE/CE | SA/CE | Conf/CE |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["ratio_to_CE"]
        step = "-" if r["step"] is None else r["step"]
        out.append(f"| {r['model']} | {step} | {r['corpus']} | {r['non_embedding_parameters']:,} | "
                   f"{r['CE']:.4f} | {r['EE']:.4f} | {r['SA']:.4f} | {r['Conf']:.4f} | "
                   f"{q['EE']:.3f} | {q['SA']:.3f} | {q['Conf']:.3f} |")
    return "\n".join(out)


NO_POWER_LAW = ("No power law fitted: a scaling law in model size needs several model sizes "
                "evaluated on one corpus (two at the very least, and far more for its exponent to "
                "mean anything); these results have one size per corpus. Evaluate more models of "
                "a family on the same corpus and run `rankops fit` on all their results.")


def component_fits(x, values: dict) -> dict:
    """The power law log M = a + b log X of each component over model sizes x, as `rankops fit`
    fits them (Conf as log|Conf|). values maps COMPONENTS' short names (CE, EE, SA, Conf) to one
    value per size. Returns {"r_squared": {name: R^2}, "alpha": {name: alpha},
    "scaling_difference": {EE, SA, Conf: |alpha_M - alpha_CE|}}."""
    missing = [short for short, _, _ in COMPONENTS if short not in values]
    if missing:
        raise ValueError(f"values: no {', '.join(missing)} (it needs CE, EE, SA and Conf)")
    fits = {short: fit_power_law(x, values[short], name=short, log_abs=log_abs) for short, _, log_abs in COMPONENTS}
    return {"r_squared": {k: f.r_squared for k, f in fits.items()},
            "alpha": {k: f.alpha for k, f in fits.items()},
            "scaling_difference": {k: scaling_difference(f, fits["CE"]) for k, f in fits.items() if k != "CE"}}


def scaling_tables(results: List[dict], *, allow_empty: bool = False) -> List[dict]:
    """One row per (group, corpus) with at least two distinct model sizes: R^2, alpha and the
    scaling difference |alpha_M - alpha_CE| of each component. With no such group: a
    ValueError, or [] with allow_empty=True."""
    points = final_points(results)
    groups = {}
    for r in points:
        corpus = r["corpus"]["name"]
        groups.setdefault((r["model"].get("family") or "unknown", corpus), []).append(r)
        groups.setdefault(("all", corpus), []).append(r)
    rows = []
    for (group, corpus), members in sorted(groups.items()):
        x = [m["model"]["n_parameters"]["non_embedding"] for m in members]
        if len(set(x)) < 2:
            continue
        if group == "all" and len({m["model"].get("family") for m in members}) == 1:
            continue  # the same models as the single family's row
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RankopsFitWarning)
            fitted = component_fits(x, {short: [m["decomposition"][key] for m in members]
                                        for short, key, _ in COMPONENTS})
        rows.append({"group": group, "corpus": corpus, "n_models": len(members), **fitted,
                     "warnings": sorted({str(w.message) for w in caught})})
    if not rows and not allow_empty:
        raise ValueError("no group has two or more model sizes on one corpus: nothing to fit")
    return rows


def markdown(rows: List[dict]) -> str:
    out = ["R^2 of log M = a + b log X (X: non-embedding parameters; Conf fitted as log|Conf|)", "",
           "| group | corpus | models | CE | EE | SA | Conf |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["r_squared"]
        out.append(f"| {r['group']} | {r['corpus']} | {r['n_models']} | {q['CE']:.3f} | {q['EE']:.3f} | "
                   f"{q['SA']:.3f} | {q['Conf']:.3f} |")
    out += ["", "Scaling difference |alpha_M - alpha_CE| (alpha_CE in the last column)", "",
            "| group | corpus | EE | SA | Conf | alpha_CE |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["scaling_difference"]
        out.append(f"| {r['group']} | {r['corpus']} | {d['EE']:.4f} | {d['SA']:.4f} | {d['Conf']:.4f} | "
                   f"{r['alpha']['CE']:.4f} |")
    notes = sorted({w for r in rows for w in r["warnings"]})
    if notes:
        out += [""] + [f"Note: {w}" for w in notes]
    return "\n".join(out)
