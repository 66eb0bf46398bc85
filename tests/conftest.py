"""Shared fixtures: every backend this installation offers, and every compiled CPU instruction set."""
import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter: this is how
# CI checks them. It must be set before the first kernel is defined (rankops imports them lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rankops
from rankops import _ext
from rankops.ops.common import triton_interpreted

# A source checkout imported without its build would silently skip the C++ kernel's tests.
if not _ext.has_cpu_kernel() and os.environ.get("RANKOPS_ALLOW_NO_EXTENSION") != "1":
    raise RuntimeError(f"rankops._C is not importable ({_ext.IMPORT_ERROR}); build it with "
                       "`pip install -e .`, or set RANKOPS_ALLOW_NO_EXTENSION=1 to test without it")

HOST_BACKENDS = ("cpu", "torch")  # backends that take CPU tensors; the others need a GPU


def runs_on_host(name):
    # Triton kernels run on CPU tensors under its interpreter (how CI checks them without a GPU).
    return name in HOST_BACKENDS or (name == "triton" and triton_interpreted())


@pytest.fixture(params=rankops.available_backends())
def backend(request):
    """Each available backend by name; new backends join by appearing in available_backends()."""
    if not runs_on_host(request.param) and not torch.cuda.is_available():
        pytest.skip(f"backend {request.param!r} needs a CUDA device")
    return request.param


@pytest.fixture
def device(backend):
    """Where the backend's inputs live."""
    return torch.device("cpu") if runs_on_host(backend) else torch.device("cuda")


def compiled_isas():
    return _ext.cpu_compiled_isas() if _ext.has_cpu_kernel() else []


@pytest.fixture(params=compiled_isas())
def cpu_isa(request):
    """Runs the test with the CPU kernel forced to one instruction set, then restores "auto"."""
    if not _ext.cpu_isa_supported(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    _ext.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _ext.set_cpu_isa("auto")
