"""study/ladder.py's analysis reproduces the committed summary from the committed data.

Everything after training (fits, bootstrap intervals, saturating fits, tables, figures) reads
only what a run leaves in study/ladder/; here it runs on a copy of that folder with a few
resamples, and every point estimate must equal the committed one (the intervals depend on the
number of resamples, so only their presence and order are checked).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "study" / "ladder"


@pytest.mark.skipif(not (LADDER / "run.json").exists(), reason="the ladder's committed data is not here")
def test_ladder_analysis_reproduces_the_committed_summary(tmp_path):
    out = tmp_path / "ladder"
    shutil.copytree(LADDER, out, ignore=shutil.ignore_patterns("figures", "summary.json", "tables.md"))
    r = subprocess.run([sys.executable, str(ROOT / "study" / "ladder.py"), "--analyse-only", "--out", str(out),
                        "--bootstrap", "20"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((LADDER / "summary.json").read_text())
    assert [m["corpora"] for m in got["models"]] == [m["corpora"] for m in want["models"]]
    assert got["pretrained"] == want["pretrained"]
    for corpus, fit in want["fits"].items():
        for key in ("alpha", "r_squared", "scaling_difference", "r_squared_EE_minus_CE",
                    "ee_share_slope_per_decade"):
            assert got["fits"][corpus][key] == pytest.approx(fit[key], rel=1e-9), (corpus, key)
        for component, sat in fit["saturating"].items():
            assert got["fits"][corpus]["saturating"][component] == pytest.approx(sat, rel=1e-9), (corpus, component)
        low, high = got["fits"][corpus]["intervals"]["r_squared"]["EE"]
        assert low <= high
    assert {p.name for p in (out / "figures").glob("*.png")} == {p.name for p in (LADDER / "figures").glob("*.png")}
