"""Non-finite logits with check_finite=False: every backend follows the definition exactly.

docs/DESIGN.md: IEEE arithmetic on logp = z_t - logsumexp(z), where logsumexp is NaN if any
entry is NaN, else +inf if any is +inf, else -inf if all are -inf. So a finite target beside a
+inf gives -inf, an all -inf row NaN (-inf - -inf), a +inf target beside another +inf NaN, a
-inf target among finite values -inf. rank and ties use IEEE comparisons (NaN is never greater
nor equal). Backends used to disagree: NaN on cpu/triton and -inf on torch beside a +inf; -inf on
cpu and NaN on torch/triton for an all -inf row.
"""
import math

import numpy as np
import pytest
import torch

import rankops
from rankops.ops.token_stats import token_stats_op

INF, NAN = math.inf, math.nan


def _lse(row):
    """logsumexp by the definition's rules, in float64."""
    if np.isnan(row).any():
        return NAN
    if (row == INF).any():
        return INF
    if (row == -INF).all():
        return -INF
    m = row[np.isfinite(row)].max()
    return m + math.log(np.exp(row[np.isfinite(row)] - m).sum())


def _expected(z, t, n_cols, z_t=None):
    """(rank, ties, logp) from the definitions, numpy float64; z_t given: target-logit mode."""
    row = z[:n_cols].astype(np.float64)
    own = z_t is None
    zt = row[t] if own else z_t
    rank = int((row > zt).sum())
    ties = int((row == zt).sum()) - (1 if own and zt == zt else 0)
    with np.errstate(invalid="ignore"):
        logp = zt - _lse(row)
    return rank, ties, logp


def _special(n_vocab):
    """(name, values {column: value}, target, vocab_size or None) over a finite background."""
    last = n_vocab - 1
    mid = n_vocab // 2
    return [
        ("finite", {}, 3, None),
        ("plus_inf_elsewhere", {mid: INF}, 3, None),
        ("two_plus_inf_elsewhere", {1: INF, last: INF}, 3, None),
        ("plus_inf_target_alone", {3: INF}, 3, None),
        ("plus_inf_target_beside_plus_inf", {3: INF, mid: INF}, 3, None),
        ("minus_inf_target", {3: -INF}, 3, None),
        ("minus_inf_elsewhere", {0: -INF, mid: -INF, last: -INF}, 3, None),
        ("all_minus_inf", "all_-inf", 3, None),
        ("all_minus_inf_but_target_finite", "all_-inf_but_target", 3, None),
        ("nan_elsewhere", {mid: NAN}, 3, None),
        ("nan_target", {3: NAN}, 3, None),
        ("nan_and_plus_inf", {1: INF, mid: NAN}, 3, None),
        ("plus_inf_and_minus_inf", {1: INF, last: -INF}, 3, None),
        ("minus_inf_target_beside_plus_inf", {3: -INF, mid: INF}, 3, None),
        ("minus_inf_target_and_rest", {3: -INF, 0: -INF, last: -INF}, 3, None),
        ("plus_inf_in_padding", {last: INF}, 3, n_vocab - 2),
        ("nan_in_padding", {last: NAN}, 3, n_vocab - 2),
        ("all_minus_inf_in_vocab", "all_-inf_keep_padding", 3, n_vocab - 2),
        ("plus_inf_last_real_column", {n_vocab - 3: INF}, 3, n_vocab - 2),
    ]


def _table(dtype, n_vocab, seed=0, device="cpu"):
    """logits [R, n_vocab] and targets [R] on device, the cases' names and vocab_sizes, one row
    per case."""
    cases = _special(n_vocab)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(cases), n_vocab, generator=g, dtype=torch.float64) * 3
    for i, (_, values, t, vs) in enumerate(cases):
        if values == "all_-inf":
            z[i] = -INF
        elif values == "all_-inf_but_target":
            z[i] = -INF
            z[i, t] = 0.5
        elif values == "all_-inf_keep_padding":
            z[i, :vs] = -INF
        else:
            for col, val in values.items():
                z[i, col] = val
    targets = torch.tensor([c[2] for c in cases])
    return z.to(dtype).to(device), targets.to(device), cases


def _check(got, want, where):
    rank, ties, logp = got
    w_rank, w_ties, w_logp = want
    assert (rank, ties) == (w_rank, w_ties), where
    if math.isnan(w_logp) or math.isinf(w_logp):
        assert (math.isnan(logp) and math.isnan(w_logp)) or logp == w_logp, (where, logp, w_logp)
    else:
        assert math.isfinite(logp) and abs(logp - w_logp) <= 1e-5 * max(1.0, abs(w_logp)), \
            (where, logp, w_logp)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("n_vocab", [7, 5000, 40000])
def test_nonfinite_rows_follow_the_definition(backend, device, dtype, n_vocab):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 logits: torch backend only")
    if n_vocab > 16384 and backend == "triton" and dtype != torch.float32:
        pytest.skip("several slices per row: float32 is enough under the slow interpreter")
    z, targets, cases = _table(dtype, n_vocab, device=device)
    z_np = z.double().cpu().numpy()
    for i, (name, _, t, vs) in enumerate(cases):
        s = rankops.token_stats(z[i:i + 1], targets[i:i + 1], vocab_size=vs, backend=backend,
                                check_finite=False)
        got = (int(s.rank[0]), int(s.ties[0]), float(s.logp[0]))
        _check(got, _expected(z_np[i], t, vs or n_vocab), (name, backend, str(dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows_in_one_batch_agree_across_backends(backend, device, dtype):
    """All cases in one call (and a strided view): each row as on its own, as the definition."""
    z, targets, cases = _table(dtype, 5000, seed=1, device=device)
    wide = torch.zeros(z.shape[0], z.shape[1] + 3, dtype=dtype, device=device)
    wide[:, 1:-2] = z
    view = wide[:, 1:-2]
    z_np = z.double().cpu().numpy()
    s = rankops.token_stats(view, targets, backend=backend, check_finite=False)
    for i, (name, _, t, _) in enumerate(cases):
        got = (int(s.rank[i]), int(s.ties[i]), float(s.logp[i]))
        _check(got, _expected(z_np[i], t, z.shape[1]), (name, backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_vocab", [7, 5000])
def test_target_logit_mode_follows_the_definition(backend, device, dtype, n_vocab):
    """The vocabulary-parallel mode: z_t is given and may lie outside the shard; logp is
    z_t - logsumexp(shard) by the same rules, ties count every equal column."""
    z, targets, cases = _table(dtype, n_vocab, seed=2, device=device)
    z_np = z.double().cpu().numpy()
    external = [0.25, INF, -INF, NAN, 1e30 if dtype != torch.float16 else 6e4, -200.0]
    for i, (name, _, t, vs) in enumerate(cases):
        n_cols = vs or n_vocab
        for z_t in [float(z_np[i, t])] + external:
            # a value of the logits' dtype, as a shard's target logit always is
            t_logit = torch.tensor([z_t], dtype=torch.float32).to(dtype).float().to(device)
            rank, ties, logp, _ = token_stats_op(z[i:i + 1], targets[i:i + 1], -100, n_cols, backend,
                                                 t_logit)
            got = (int(rank[0]), int(ties[0]), float(logp[0]))
            _check(got, _expected(z_np[i], t, n_cols, float(t_logit[0])), (name, z_t, backend))


def test_all_minus_inf_shard_below_external_target(backend, device):
    """A shard far below the (external) target logit: its logsumexp is still exact."""
    z = torch.full((1, 3000), -200.0, device=device)
    z[0, 5] = -150.0
    for z_t in (0.0, 50.0):
        _, _, logp, _ = token_stats_op(z, torch.tensor([1], device=device), -100, 3000, backend,
                                       torch.tensor([z_t], device=device))
        want = z_t - _lse(z[0].double().cpu().numpy())
        assert abs(float(logp[0]) - want) <= 1e-5 * abs(want), (z_t, float(logp[0]), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows_on_every_cpu_isa(cpu_isa, dtype):
    """The C++ kernel's special cases on each compiled instruction set, several slices a row."""
    z, targets, cases = _table(dtype, 40000, seed=3)
    z_np = z.double().numpy()
    s = rankops.token_stats(z, targets, backend="cpu", check_finite=False)
    for i, (name, _, t, _) in enumerate(cases):
        got = (int(s.rank[i]), int(s.ties[i]), float(s.logp[i]))
        _check(got, _expected(z_np[i], t, z.shape[1]), (name, cpu_isa))
