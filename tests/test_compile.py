"""torch.library registration: torch.compile traces through the kernels (fullgraph, no breaks)."""
import os

import pytest
import torch

import rankops
from rankops.ops.accumulate import accumulate_op, new_state
from rankops.ops.token_stats import token_stats_op
from conftest import runs_on_host

KERNEL_BACKENDS = [b for b in rankops.available_backends() if b != "torch" and runs_on_host(b)]


def sync_free_stats(logits, targets, backend):
    s = rankops.token_stats(logits, targets, backend=backend, check_finite=False, validate=False)
    return s.rank, s.ties, s.logp


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_token_stats_equals_eager(backend, compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 301, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 301, (3, 5), generator=g)
    targets[0, 1] = -100
    compiled = torch.compile(sync_free_stats, fullgraph=True, backend=compiler)
    got = compiled(logits, targets, backend)
    want = sync_free_stats(logits, targets, backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[0][0, 1] == -1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_accumulate_op_under_compile_mutates_stats(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 257, generator=g)
    targets = torch.randint(0, 257, (16,), generator=g)

    def add(stats):
        _, n_tied, n_skipped = new_state(257)
        return accumulate_op(logits, targets, -100, 257, backend, False, False, stats, n_tied, n_skipped)

    eager_stats = torch.zeros(6, 257, dtype=torch.int64)
    add(eager_stats)
    compiled_stats = torch.zeros(6, 257, dtype=torch.int64)
    torch.compile(add, fullgraph=True, backend="aot_eager")(compiled_stats)
    assert torch.equal(compiled_stats, eager_stats)
    assert int(compiled_stats[0].sum()) == 16


def test_fake_tensor_shapes():
    # The fake implementations give torch.compile the output shapes without running a kernel.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(4, 7, 1000, dtype=torch.bfloat16)
        targets = torch.empty(4, 7, dtype=torch.int64)
        rank, ties, logp, first_bad = token_stats_op(logits, targets, -100, 1000, "cpu")
    assert rank.shape == ties.shape == logp.shape == (4, 7)
    assert (rank.dtype, ties.dtype, logp.dtype, first_bad.shape) == (torch.int64, torch.int64, torch.float32, ())


def test_opcheck_token_stats():
    # torch.library.opcheck checks the registration: schema, fake kernel, autograd wiring.
    if "cpu" not in KERNEL_BACKENDS:
        pytest.skip("CPU kernel not built")
    logits = torch.randn(6, 50)
    targets = torch.randint(0, 50, (6,))
    torch.library.opcheck(token_stats_op, (logits, targets, -100, 50, "cpu"))


@pytest.mark.skipif(os.environ.get("RANKOPS_EXPECT_CUDA") != "1",
                    reason="set RANKOPS_EXPECT_CUDA=1 where the build must include the CUDA kernels")
def test_build_includes_cuda_kernels():
    # CI sets this: nvcc is there, so a CUDA compile error must fail the build, not be skipped.
    from rankops import _ext
    assert _ext.has_cuda_kernel()
