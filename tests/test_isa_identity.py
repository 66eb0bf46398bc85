"""Every compiled instruction set of the CPU kernels gives the same bits.

The baseline (SSE2) build and the AVX2/AVX-512 builds run one source; the -mfma builds used to
contract `a * b + c` into fused multiply-adds, which round once instead of twice, so logp
differed by an ulp in about 1% of rows and accumulators differed between machines. The builds
now compile with -ffp-contract=off: the same operations in the same order on every ISA.
"""
import pytest
import torch

import rankops
from rankops import _ext
from rankops.ops.softmax_grad import softmax_grad

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _supported_isas():
    return [isa for isa in _ext.cpu_compiled_isas() if _ext.cpu_isa_supported(isa)]


def _per_isa(fn):
    out = {}
    try:
        for isa in _supported_isas():
            _ext.set_cpu_isa(isa)
            out[isa] = fn()
    finally:
        _ext.set_cpu_isa("auto")
    return out


def _rows(dtype, n_rows=3000, n_vocab=1031, seed=0):
    # Logits of a few magnitudes (softmax spread from flat to peaked), a strided view, and a
    # vocabulary past one 2048-column chunk so the chunk merge is exercised too.
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 4.0, 20.0]).repeat_interleave(n_rows // 3 + 1)[:n_rows, None]
    z = (torch.randn(n_rows, n_vocab + 5, generator=g) * scale).to(dtype)[:, 2:n_vocab + 2]
    t = torch.randint(0, n_vocab, (n_rows,), generator=g)
    return z, t


@pytest.mark.skipif(len(_supported_isas()) < 2, reason="only one instruction set runs here")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_vocab", [1031, 5000])
def test_token_stats_bit_identical_across_isas(dtype, n_vocab):
    z, t = _rows(dtype, n_vocab=n_vocab, n_rows=3000 if n_vocab < 2048 else 600)
    res = _per_isa(lambda: rankops.token_stats(z, t, backend="cpu"))
    first = next(iter(res.values()))
    for isa, r in res.items():
        assert torch.equal(r.rank, first.rank), isa
        assert torch.equal(r.ties, first.ties), isa
        assert torch.equal(r.logp.view(torch.int32), first.logp.view(torch.int32)), isa


@pytest.mark.skipif(len(_supported_isas()) < 2, reason="only one instruction set runs here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulator_bit_identical_across_isas(dtype):
    z, t = _rows(dtype, seed=1)

    def run():
        acc = rankops.RankAccumulator(z.shape[-1])
        acc.update(z, t, backend="cpu")
        return acc.stats.clone()
    res = _per_isa(run)
    first = next(iter(res.values()))
    for isa, stats in res.items():
        assert torch.equal(stats, first), isa


@pytest.mark.skipif(len(_supported_isas()) < 2, reason="only one instruction set runs here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_bit_identical_across_isas(dtype):
    z, t = _rows(dtype, n_rows=600, seed=2)
    s = rankops.token_stats(z, t, backend="cpu")
    lse = (z.gather(1, t[:, None]).squeeze(1).float() - s.logp).contiguous()
    scale = torch.linspace(-2.0, 3.0, z.shape[0])
    res = _per_isa(lambda: softmax_grad(z, t, lse, scale, -100, z.shape[-1], "cpu"))
    first = next(iter(res.values()))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for isa, g in res.items():
        assert torch.equal(g.view(bits), first.view(bits)), isa
