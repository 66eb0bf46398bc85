"""The docstring examples that run on their own are run as doctests, so they cannot rot."""
import doctest
import importlib

import pytest
import torch

import rankops

# By name: the package's `rankops.decompose` is the function, not the module.
MODULES = [importlib.import_module(name) for name in
           ("rankops.ops.token_stats", "rankops.decompose", "rankops.accumulate")]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"rankops": rankops, "torch": torch},
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module.__name__} has no runnable example"
    assert result.failed == 0
