"""`rankops bench` (rankops.bench): checks before it times, the table, the JSON rows, and a loud
failure, not a timing, when a backend is wrong."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankops
from rankops import _ext, bench
from rankops.cli import build_parser, main
from rankops.ops.common import triton_interpreted

REPO = Path(__file__).resolve().parents[1]
TINY = ["--shapes", "3x700", "--dtypes", "fp32", "--repeat", "1"]
# What bench/gpu_summary.py and the recorded rows read: every row keeps these.
ROW_FIELDS = {"date", "torch", "rankops", "python", "machine", "processor", "threads", "op", "backend",
              "role", "device", "dtype", "N", "V", "ms", "bytes", "gbps", "read_baseline", "baseline_gbps",
              "bw_frac", "copy_gbps", "speedup_vs_torch", "speedup_vs_compiled", "speedup_vs_ce_compiled",
              "speedup_vs_liger", "speedup_vs_serving_rank", "acc_over_token_stats", "peak_extra_mb",
              "checked", "repeat", "timing", "sync_free"}


def host_triton():
    """Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1, how CI runs it
    without a GPU); on a GPU machine it needs CUDA tensors, so --device cpu cannot time it."""
    return "triton" in rankops.available_backends() and triton_interpreted()


def test_bench_checks_times_and_writes_rows(tmp_path, capsys):
    rows_path = tmp_path / "rows.jsonl"
    triton = ["triton"] if host_triton() else []
    status = main(["bench", "--device", "cpu", "--backends", "cpu", "torch", *triton, *TINY,
                   "--json", str(rows_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "[1/1] fp32 3x700: checked cpu (logp error" in out
    assert ("triton (logp error" in out) == bool(triton)
    assert "ranks and ties exact" in out
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    names = [r["backend"] for r in rows]
    acc_triton = ["triton", "acc_triton"] if triton else []
    assert sorted(names) == sorted(["read_amax", "read_sum", "torch", "cpu", "acc_cpu", *acc_triton])
    existing = json.loads((REPO / "bench/results/token_stats_cpu.jsonl").read_text().splitlines()[0])
    for r in rows:
        assert ROW_FIELDS <= set(r) and set(existing) <= set(r), set(existing) - set(r)
        assert (r["op"], r["device"], r["dtype"], r["N"], r["V"], r["checked"]) == \
            ("token_stats", "cpu", "fp32", 3, 700, "full")
        assert r["ms"] > 0 and r["bytes"] >= 3 * 700 * 4
        assert r["role"] == ("rankops" if r["backend"] in ("cpu", "acc_cpu", "triton", "acc_triton") else "baseline")
    by_name = {r["backend"]: r for r in rows}
    assert by_name["acc_cpu"]["acc_over_token_stats"] == pytest.approx(by_name["acc_cpu"]["ms"] / by_name["cpu"]["ms"], rel=1e-2)
    assert by_name["cpu"]["speedup_vs_torch"] == pytest.approx(by_name["torch"]["ms"] / by_name["cpu"]["ms"], rel=1e-2)
    # The table: a header, a separator and one line per row, in the rows' order.
    table = out[out.index("| candidate |"):].strip().splitlines()
    assert table[0].startswith("| candidate | dtype | N | V | ms | GB/s |") and set(table[1]) <= set("|-")
    assert [line.split("|")[1].strip() for line in table[2:]] == names


def broken_cpu_kernel(monkeypatch, what):
    real = _ext.cpu_token_stats

    def broken(*args, **kwargs):
        rank, ties, logp, first_bad = real(*args, **kwargs)
        if what == "rank":
            rank = torch.where(rank >= 0, rank + (rank % 7 == 3).long(), rank)  # a few ranks off by one
        else:
            logp = logp * (1 + 1e-5)  # about 100 ulp: within 1e-4, far outside the bound
        return rank, ties, logp, first_bad
    monkeypatch.setattr(_ext, "cpu_token_stats", broken)


@pytest.mark.parametrize("what", ["rank", "logp"])
def test_a_wrong_backend_fails_loudly_and_nothing_is_timed(monkeypatch, tmp_path, capsys, what):
    broken_cpu_kernel(monkeypatch, what)
    rows_path = tmp_path / "rows.jsonl"
    timed = []
    monkeypatch.setattr(bench, "time_interleaved", lambda *a, **k: timed.append(1) or {})
    status = main(["bench", "--device", "cpu", "--backends", "cpu", "--shapes", "64x5000", "--dtypes", "fp32",
                   "--repeat", "1", "--json", str(rows_path)])
    captured = capsys.readouterr()
    assert status == 1
    assert f"FAIL: backend cpu: {what}" in captured.err
    assert not timed and not rows_path.exists() and "| candidate |" not in captured.out


def test_a_wrong_accumulator_fails_loudly(monkeypatch, capsys):
    real = rankops.RankAccumulator.update

    def drops_a_token(self, logits, targets, **kwargs):
        return real(self, logits[:-1], targets[:-1], **kwargs)  # row 0 is an ignored one
    monkeypatch.setattr(rankops.RankAccumulator, "update", drops_a_token)
    assert main(["bench", "--device", "cpu", "--backends", "cpu", *TINY]) == 1
    assert "FAIL: RankAccumulator.update(backend='cpu')" in capsys.readouterr().err


def test_the_logp_bound_is_the_tests_bound():
    # G(V) u max(1, |logp|, |lse|), as tests/test_token_stats.py states it.
    logp = torch.tensor([-0.5, -3.0, -20.0], dtype=torch.float64)
    lse = torch.tensor([2.0, 12.0, 5.0], dtype=torch.float64)
    growth = 4 + 2 * 10  # V = 1024
    want = torch.tensor([2.0, 12.0, 20.0], dtype=torch.float64) * growth * 2.0 ** -24
    assert torch.equal(bench.logp_bound(1024, logp, lse), want)


@pytest.mark.parametrize("argv, message", [
    (["--backends", "cuda"], "'cuda' is not available here"),
    (["--device", "cuda"], "no CUDA device"),
    (["--repeat", "0"], "--repeat must be at least 1"),
])
def test_arguments_that_cannot_run_here_exit_2(argv, message, capsys):
    if torch.cuda.is_available():
        pytest.skip("these arguments can run on this machine")
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--n", "0", "--v", "100"], "needs N >= 1 rows"),
    (["--json", "/nonexistent-folder/rows.jsonl"], "--json: the folder"),
])
def test_bad_cases_and_paths_exit_2_before_anything_runs(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "FAIL" not in err


def test_the_default_cases_are_the_quick_ones():
    args = build_parser().parse_args(["bench", "--device", "cpu"])
    opts = bench.options_from_args(args, "quick")
    assert opts.shapes == ((1024, 50304), (1024, 128256)) and opts.dtypes == ("bf16", "fp32")
    assert opts.backends == ("cpu",) and opts.baselines == ("read_amax", "read_sum", "torch") and opts.repeat == 5


def test_the_benchmark_script_is_the_same_benchmark(tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "bench/bench_token_stats.py", "--backends", "cpu", *TINY,
                        "--json", str(rows_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert {row["backend"] for row in rows} == {"read_amax", "read_sum", "torch", "cpu", "acc_cpu"}
    assert "| candidate |" in r.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None or importlib.util.find_spec("triton") is None,
                    reason="needs nvcc and Triton (no GPU)")
def test_kernel_census_finds_each_streaming_loop():
    # bench/kernel_census.py: the hot loop of each GPU kernel, found in its sm_90 SASS. A loop
    # of the streaming kind holds at least one instruction per element (the exp alone is more).
    out = subprocess.run([sys.executable, str(REPO / "bench/kernel_census.py")], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr
    per_element = dict(re.findall(r"^(cuda \w+|triton \w+)\s.*=\s+([\d.]+) per element", out.stdout, re.M))
    assert set(per_element) == {"cuda bf16", "cuda fp16", "cuda fp32", "triton bf16", "triton fp32"}, out.stdout
    assert all(10 < float(v) < 200 for v in per_element.values()), per_element


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_exp2_error_measures_every_kind_of_row(tmp_path):
    # bench/exp2_error.py (for a GPU) runs its logic under the interpreter: each kind of row's
    # mean relative sum error, finite and small (numpy's exp2 there), and one JSON line.
    env = dict(os.environ, TRITON_INTERPRET="1")
    rows = tmp_path / "exp2.jsonl"
    out = subprocess.run([sys.executable, str(REPO / "bench/exp2_error.py"), "--rows", "16", "--cols", "512",
                          "--json", str(rows)], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(rows.read_text())["sum_rel_error"]
    assert set(got) == {"uniform", "gaussian", "gaussian_bf16", "peaked"}
    assert all(abs(v["mean"]) < 1e-7 and v["se"] > 0 for v in got.values()), got
