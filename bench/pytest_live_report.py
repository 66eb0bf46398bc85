"""A pytest plugin for the GPU suite: writes each failure (with its traceback) and each slow test
to files as they happen, so a run killed at the device's time limit still says what failed.

    RANKOPS_LIVE_DIR=logs PYTHONPATH=bench pytest -p pytest_live_report tests

failures.txt gets the node id, phase and report of every failed test; slow.txt every phase
that took over RANKOPS_LIVE_SLOW_S seconds (default 10); outcomes.txt one line per finished
test (its outcome and node id), so that the tests a cut run never finished can be listed
against `pytest --collect-only -q`. Under pytest-xdist the reports reach the controller,
which writes them.
"""
import os
import time

_DIR = os.environ.get("RANKOPS_LIVE_DIR", ".")
_SLOW_S = float(os.environ.get("RANKOPS_LIVE_SLOW_S", "10"))


def _append(name, text):
    with open(os.path.join(_DIR, name), "a") as f:
        f.write(text)


_WORKER = False


def pytest_configure(config):
    global _WORKER
    _WORKER = hasattr(config, "workerinput")  # an xdist worker: its controller writes


def pytest_runtest_logreport(report):
    if _WORKER:
        return
    if report.failed:
        text = report.longreprtext
        if len(text) > 6000:
            text = text[:1500] + "\n[...]\n" + text[-4000:]
        _append("failures.txt", f"===== {report.nodeid} ({report.when}) at {time.strftime('%H:%M:%S')}\n{text}\n\n")
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _append("outcomes.txt", f"{report.outcome} {report.nodeid}\n")
    if report.duration > _SLOW_S:
        _append("slow.txt", f"{report.duration:8.1f} s  {report.nodeid} ({report.when})\n")
