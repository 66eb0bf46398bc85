"""What the compiled instruction sets of the CPU kernels share, bit for bit.

The baseline (SSE2) build and the AVX2/AVX-512 builds run one source. The -mfma builds (avx2,
avx512) contract `a * b + c` into fused multiply-adds, which round once where the baseline
rounds twice, so the baseline's exp can differ in the last bit. Hence:

- rank and ties: identical on every ISA (integer counts of exact comparisons);
- logp, the accumulator's state and softmax_grad's output: bit-identical between avx2 and
  avx512; the baseline's logp is within 2 fp32 ulp of theirs (about 0.1% of rows differ).

Compiling every ISA with -ffp-contract=off makes all three identical, but costs about 45% in
fp32 (the exp polynomial is compute-bound without FMA), so it is not done.
"""
import pytest
import torch

import rankops
from rankops import _ext
from rankops.ops.softmax_grad import softmax_grad

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _supported_isas(fma_only=False):
    return [isa for isa in _ext.cpu_compiled_isas() if _ext.cpu_isa_supported(isa)
            and not (fma_only and isa == "baseline")]


def _per_isa(fn, fma_only=False):
    out = {}
    try:
        for isa in _supported_isas(fma_only):
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
    first = res[_supported_isas(fma_only=True)[0]] if _supported_isas(fma_only=True) else None
    for isa, r in res.items():
        assert torch.equal(r.rank, res["baseline"].rank), isa
        assert torch.equal(r.ties, res["baseline"].ties), isa
        if isa != "baseline":
            assert torch.equal(r.logp.view(torch.int32), first.logp.view(torch.int32)), isa
    if first is not None:  # the baseline rounds the exp polynomial without FMA
        ulp = (res["baseline"].logp.view(torch.int32) - first.logp.view(torch.int32)).abs()
        assert int(ulp.max()) <= 2


@pytest.mark.skipif(len(_supported_isas(True)) < 2, reason="fewer than two FMA instruction sets run here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulator_bit_identical_across_isas(dtype):
    z, t = _rows(dtype, seed=1)

    def run():
        acc = rankops.RankAccumulator(z.shape[-1])
        acc.update(z, t, backend="cpu")
        return acc.stats.clone()
    res = _per_isa(run, fma_only=True)
    first = next(iter(res.values()))
    for isa, stats in res.items():
        assert torch.equal(stats, first), isa


@pytest.mark.skipif(len(_supported_isas(True)) < 2, reason="fewer than two FMA instruction sets run here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_grad_bit_identical_across_isas(dtype):
    z, t = _rows(dtype, n_rows=600, seed=2)
    s = rankops.token_stats(z, t, backend="cpu")
    lse = (z.gather(1, t[:, None]).squeeze(1).float() - s.logp).contiguous()
    scale = torch.linspace(-2.0, 3.0, z.shape[0])
    res = _per_isa(lambda: softmax_grad(z, t, lse, scale, -100, z.shape[-1], "cpu"), fma_only=True)
    first = next(iter(res.values()))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for isa, g in res.items():
        assert torch.equal(g.view(bits), first.view(bits)), isa
