"""Checks that need a GPU: every GPU backend against the reference on CUDA tensors, a case
past 2^31 elements, bit-identical reruns, torch.compile, and CUDA-graph capture. Skipped
without a GPU (the backend-parametrised suites in the other files also run on GPU tensors)."""
import pytest
import torch

import rankops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in rankops.available_backends()]


def make(n_rows, n_vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n_rows, n_vocab, generator=g, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g, device="cuda")
    targets[::7] = -100
    return logits, targets


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 262144), (7, 50257), (64, 151936), (513, 4099)])
def test_matches_reference(backend, dtype, shape):
    logits, targets = make(*shape, dtype)
    got = rankops.token_stats(logits, targets, backend=backend)
    ref = rankops.token_stats(logits, targets, backend="torch")
    assert torch.equal(got.rank, ref.rank) and torch.equal(got.ties, ref.ties)
    torch.testing.assert_close(got.logp, ref.logp, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    # 16500 x 131072 bf16 = 2.16e9 elements (4.3 GB): offsets must be 64-bit. The reference is
    # run on a few rows near the end, where 32-bit offsets would wrap.
    n_rows, n_vocab = 16500, 131072
    logits, targets = make(n_rows, n_vocab, torch.bfloat16)
    got = rankops.token_stats(logits, targets, backend=backend)
    tail = slice(n_rows - 64, n_rows)
    ref = rankops.token_stats(logits[tail], targets[tail], backend="torch")
    assert torch.equal(got.rank[tail], ref.rank) and torch.equal(got.ties[tail], ref.ties)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bit_identical_reruns(backend):
    logits, targets = make(4096, 32000, torch.bfloat16)
    a, b = rankops.RankAccumulator(32000), rankops.RankAccumulator(32000)
    a.update(logits, targets, backend=backend)
    b.update(logits, targets, backend=backend)
    assert torch.equal(a.stats, b.stats)
    s1 = rankops.token_stats(logits, targets, backend=backend)
    s2 = rankops.token_stats(logits, targets, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(s1, s2))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile(backend):
    def f(logits, targets):
        s = rankops.token_stats(logits, targets, backend=backend, check_finite=False, validate=False)
        return s.rank, s.logp.sum()
    logits, targets = make(64, 50257, torch.bfloat16)
    got = torch.compile(f, fullgraph=True)(logits, targets)
    want = f(logits, targets)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    logits, targets = make(256, 50257, torch.bfloat16)
    acc = rankops.RankAccumulator(50257, device="cuda")
    kwargs = dict(backend=backend, check_finite=False, validate=False)
    acc.update(logits, targets, **kwargs)  # warm-up: compiles kernels, allocates
    acc.load_state_dict(rankops.RankAccumulator(50257, device="cuda").state_dict())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        acc.update(logits, targets, **kwargs)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    eager = rankops.RankAccumulator(50257, device="cuda")
    for _ in range(3):
        eager.update(logits, targets, backend=backend)
    assert torch.equal(acc.stats, eager.stats)
