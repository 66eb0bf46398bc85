"""logp's mean error against float64 on a fixed, realistic sample (the bias of issue 16).

A per-token error of ~1e-7 is rounding noise and averages out over a corpus; a mean error does
not: CE is the mean of -logp, so a +2e-7 mean error reads CE 2e-7 low on every corpus. The CPU
kernel had one (fp32 lane sums losing tiny terms, always downwards: docs/DESIGN.md, "Accuracy
of logp"). Each backend's mean error over the sample must be within BIAS_BOUND, and the sample
must be large enough for that to mean something: its standard error is held under SE_BOUND.

The sample: 512 rows of V = 49152 (SmolLM2's vocabulary) in the shape of a small LM's logits
(a Gaussian bulk of std 3, 1024 tokens lifted by up to 10: entropy ~2.3 nats, the top-1 token
right half the time, ~500 logits within 10 of the max), targets drawn from each row's own
softmax. Per-token errors have a std of ~8e-8 (mostly logp's own fp32 rounding), so the
standard error of the mean is ~3.5e-9: a 2e-8 bias stands out at over 5 standard errors. The old
kernel's +2e-7 fails by far.
"""
import math
import os

import pytest
import torch

import rankops

BIAS_BOUND = 2e-8   # |mean(logp - logp_float64)|
SE_BOUND = 5e-9     # standard error of that mean: the sample must resolve BIAS_BOUND
N_ROWS, N_VOCAB = 512, 49152

_SAMPLE = {}


def _sample():
    """Logits [N_ROWS, N_VOCAB] float32, targets [N_ROWS], and the float64 logp."""
    if not _SAMPLE:
        g = torch.Generator().manual_seed(16)
        z = torch.randn(N_ROWS, N_VOCAB, generator=g) * 3.0 - 1.1
        lifted = torch.randint(0, N_VOCAB, (N_ROWS, 1024), generator=g)
        z.scatter_add_(1, lifted, 10.0 * torch.rand(N_ROWS, 1024, generator=g))
        lse = torch.logsumexp(z.double(), dim=1)
        t = torch.multinomial(torch.exp(z.double() - lse[:, None]), 1, generator=g).squeeze(1)
        exact = z.double().gather(1, t[:, None]).squeeze(1) - lse
        _SAMPLE.update(z=z, t=t, exact=exact)
    return _SAMPLE["z"], _SAMPLE["t"], _SAMPLE["exact"]


def _mean_error(backend):
    z, t, exact = _sample()
    err = rankops.token_stats(z, t, backend=backend).logp.double() - exact
    assert torch.isfinite(err).all()
    return err.mean().item(), err.std().item() / math.sqrt(err.numel())


def _check(backend):
    mean, se = _mean_error(backend)
    assert se < SE_BOUND, f"{backend}: the sample cannot resolve {BIAS_BOUND} (standard error {se:.2e})"
    assert abs(mean) <= BIAS_BOUND, f"{backend}: logp's mean error is {mean:+.2e} (standard error {se:.1e})"


def test_sample_is_realistic():
    # What the docstring claims of the sample, so that a change to it cannot go unnoticed.
    z, t, exact = _sample()
    logp = torch.log_softmax(z.double(), dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1).mean().item()
    top1 = (z.argmax(dim=1) == t).double().mean().item()
    assert 1.5 < entropy < 3.5 and 0.3 < top1 < 0.7
    assert -4.0 < exact.mean().item() < -1.0


def test_logp_unbiased_cpu(cpu_isa):
    _check("cpu")


def test_logp_unbiased(backend):
    if backend == "cpu":
        pytest.skip("test_logp_unbiased_cpu runs it on every instruction set")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter streams ~1 MB/s here: the 100 MB sample would take hours, and a
        # sample it can stream in seconds cannot resolve 2e-8 (docs/DESIGN.md has the numbers).
        pytest.skip("the Triton interpreter is too slow for a sample that resolves 2e-8")
    _check(backend)


def test_triton_log2e_split():
    # The Triton kernels compute exp(d) as exp2(d * LOG2E_HI + d * LOG2E_LO); with the fp32
    # constant alone every term is 1.3e-8 |d| too large (relative), a bias, not noise.
    triton_ops = pytest.importorskip("rankops.ops.token_stats_triton")
    # tl.constexpr(...) objects (the form every Triton compiles for a GPU); .value is the float.
    hi, lo = (float(getattr(c, "value", c)) for c in (triton_ops.LOG2E_HI, triton_ops.LOG2E_LO))
    assert torch.tensor(hi, dtype=torch.float32).item() == hi
    assert abs(hi + lo - 1 / math.log(2)) < 1e-16
