"""`rankops fit`: the scaling tables from hand-made results files following known laws."""
import json
import math

import pytest

from rankops.cli import main
from rankops.scaling import component_fits, load_results, scaling_tables

SIZES = [1e6, 3e6, 1e7, 3e7, 1e8]
LAWS = {"EE": (9.0, 0.30), "SA": (0.8, 0.05)}  # coefficient, alpha


def write_result(folder, name, family, corpus, x, step=None, ee_scale=1.0, conf=None):
    ee = ee_scale * LAWS["EE"][0] * x ** -LAWS["EE"][1]
    sa = LAWS["SA"][0] * x ** -LAWS["SA"][1]
    conf = -0.5 * x ** -0.1 if conf is None else conf
    result = {
        "model": {"name": name, "source": f"/models/{name}" + ("" if step is None else f"/step{step}"),
                  "family": family, "step": step,
                  "n_parameters": {"total": int(2 * x), "non_embedding": int(x)}},
        "corpus": {"name": corpus},
        "decomposition": {"cross_entropy": ee + sa - conf, "error_entropy": ee, "self_alignment": sa,
                          "confidence": conf},
    }
    path = folder / f"{name}-{corpus}-{step}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    return path


def test_exact_laws_give_r2_one_and_known_alphas(tmp_path):
    for i, x in enumerate(SIZES):
        write_result(tmp_path, f"m{i}", "llama", "austen", x)
    (row,) = scaling_tables(load_results([str(tmp_path)]))
    assert (row["group"], row["corpus"], row["n_models"]) == ("llama", "austen", 5)
    for k in ("EE", "SA", "Conf"):
        assert row["r_squared"][k] == pytest.approx(1.0, abs=1e-12)
    assert row["alpha"]["EE"] == pytest.approx(0.30, abs=1e-12)
    assert row["alpha"]["SA"] == pytest.approx(0.05, abs=1e-12)
    assert row["alpha"]["Conf"] == pytest.approx(0.10, abs=1e-12)  # fitted on log|Conf|
    # CE is a sum of power laws, so it is not exactly one: its alpha is fitted independently here.
    xs = [math.log(x) for x in SIZES]
    ys = [math.log(9.0 * x ** -0.3 + 0.8 * x ** -0.05 + 0.5 * x ** -0.1) for x in SIZES]
    mx, my = sum(xs) / 5, sum(ys) / 5
    alpha_ce = -sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    assert row["alpha"]["CE"] == pytest.approx(alpha_ce, rel=1e-10)
    assert row["scaling_difference"]["EE"] == pytest.approx(abs(0.30 - alpha_ce), rel=1e-10)


def test_component_fits_from_values_are_the_tables_fits(tmp_path):
    """component_fits (what the ladder's bootstrap fits on each resample) takes values instead of
    results files and gives exactly the fits of scaling_tables' row over the same points."""
    values = {"EE": [9.0 * x ** -0.3 for x in SIZES], "SA": [0.8 * x ** -0.05 for x in SIZES],
              "Conf": [-0.5 * x ** -0.1 for x in SIZES]}
    values["CE"] = [ee + sa - conf for ee, sa, conf in zip(values["EE"], values["SA"], values["Conf"])]
    fitted = component_fits(SIZES, values)
    assert fitted["alpha"]["EE"] == pytest.approx(0.30, abs=1e-12)
    assert fitted["alpha"]["Conf"] == pytest.approx(0.10, abs=1e-12)  # fitted on log|Conf|
    assert set(fitted["scaling_difference"]) == {"EE", "SA", "Conf"}
    assert fitted["scaling_difference"]["SA"] == abs(fitted["alpha"]["SA"] - fitted["alpha"]["CE"])
    for i, x in enumerate(SIZES):
        write_result(tmp_path, f"m{i}", "llama", "austen", x)
    (row,) = scaling_tables(load_results([str(tmp_path)]))
    for key in ("r_squared", "alpha", "scaling_difference"):
        assert row[key] == fitted[key], key
    with pytest.raises(ValueError, match="values: no Conf"):
        component_fits(SIZES, {k: v for k, v in values.items() if k != "Conf"})


def test_groups_by_family_and_corpus_and_final_checkpoint(tmp_path):
    for i, x in enumerate(SIZES[:3]):
        write_result(tmp_path, f"a{i}", "gpt2", "kjv", x)
        write_result(tmp_path, f"b{i}", "gpt_neox", "kjv", x * 1.5)
        write_result(tmp_path, f"a{i}", "gpt2", "code", x)
        # a run's checkpoints: an early one far off the law, and the final one on it; only the
        # final step may count, and the run counts once
        write_result(tmp_path, f"c{i}", "gpt2", "kjv", x * 7, step=10, ee_scale=5.0)
        write_result(tmp_path, f"c{i}", "gpt2", "kjv", x * 7, step=20)
    rows = {(r["group"], r["corpus"]): r for r in scaling_tables(load_results([str(tmp_path)]))}
    assert set(rows) == {("gpt2", "kjv"), ("gpt_neox", "kjv"), ("all", "kjv"), ("gpt2", "code")}
    assert rows[("all", "kjv")]["n_models"] == 9
    assert rows[("gpt2", "kjv")]["n_models"] == 6
    assert rows[("gpt2", "kjv")]["r_squared"]["EE"] == pytest.approx(1.0, abs=1e-12)


def test_cli_writes_tables(tmp_path, capsys):
    for i, x in enumerate(SIZES):
        write_result(tmp_path / "r", f"m{i}", "llama", "austen", x)
    assert main(["fit", str(tmp_path / "r"), "--output", str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert "| llama | austen | 5 | " in out and "Scaling difference" in out
    assert "No power law fitted" not in out
    tables = json.loads((tmp_path / "tables.json").read_text())
    assert tables["fits"][0]["alpha"]["EE"] == pytest.approx(0.30, abs=1e-12)
    assert [m["model"] for m in tables["models"]] == ["m0", "m1", "m2", "m3", "m4"]
    assert (tmp_path / "tables.md").read_text().strip() == out.strip()


def test_one_model_gets_its_table_and_shares_and_no_power_law(tmp_path, capsys):
    write_result(tmp_path / "one", "m0", "llama", "austen", 1e6, conf=0.25)
    assert main(["fit", str(tmp_path / "one"), "--output", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    ee, sa = 9.0 * 1e6 ** -0.30, 0.8 * 1e6 ** -0.05
    ce = ee + sa - 0.25
    assert (f"| m0 | - | austen | 1,000,000 | {ce:.4f} | {ee:.4f} | {sa:.4f} | 0.2500 | "
            f"{ee / ce:.3f} | {sa / ce:.3f} | {0.25 / ce:.3f} |") in out
    assert "No power law fitted" in out and "needs several model sizes" in out
    assert "R^2" not in out
    tables = json.loads((tmp_path / "t.json").read_text())
    assert tables["fits"] == [] and tables["models"][0]["ratio_to_CE"]["SA"] == pytest.approx(sa / ce, rel=1e-12)


def test_models_are_ordered_by_size_then_by_natural_name(tmp_path):
    from rankops.scaling import model_rows, natural_key
    assert sorted(["d128", "d48", "d64", "a", "d9x"], key=natural_key) == ["a", "d9x", "d48", "d64", "d128"]
    for name, x in (("d128", 5e6), ("d48", 5e6), ("big", 9e6), ("tiny", 1e5)):
        write_result(tmp_path, name, "llama", "austen", x)
    rows = model_rows(load_results([str(tmp_path)]))
    assert [r["model"] for r in rows] == ["tiny", "d48", "d128", "big"]


def test_bad_inputs(tmp_path, capsys):
    write_result(tmp_path / "one", "m0", "llama", "austen", 1e6)
    with pytest.raises(ValueError, match="two or more model sizes"):
        scaling_tables(load_results([str(tmp_path / "one")]))
    assert scaling_tables(load_results([str(tmp_path / "one")]), allow_empty=True) == []
    assert main(["fit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["fit", str(tmp_path / "bad.json")]) == 2
    assert "not a rankops eval results file" in capsys.readouterr().err
    for i, x in enumerate(SIZES[:2]):
        write_result(tmp_path / "neg", f"m{i}", "llama", "austen", x)
    bad = tmp_path / "neg" / "m0-austen-None" / "results.json"
    r = json.loads(bad.read_text())
    r["decomposition"]["error_entropy"] = -1.0  # EE is an entropy: never negative
    bad.write_text(json.dumps(r))
    with pytest.raises(ValueError):
        scaling_tables(load_results([str(tmp_path / "neg")]))
