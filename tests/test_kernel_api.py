"""The kernel-facing API (rankops._ext and the Triton launchers), tested directly on every kernel
this machine can run: cpu, triton (under TRITON_INTERPRET=1 without a GPU) and, on a GPU, cuda.

Covered here: the external target-logit mode (vocabulary-parallel statistics) against the
definitions in float64, CPU accumulation with leave_out, N-d strided logits read in place
(bit-identical to the contiguous copy), the accumulator's layout handed to the Triton kernel by
its caller, and the memory-safety checks of the binding.
"""
import ast
import importlib.util
import inspect

import pytest
import torch

from rankops import _ext
from rankops.accumulate import RankAccumulator
from rankops.ops.accumulate import (COUNT, COUNT_PESS, LAYOUT as STATE_LAYOUT, LOGP_LIMIT, LOGP_SCALE,
                                    SUM_HI, SUM_HI_PESS, SUM_LO, SUM_LO_PESS)
from rankops.ops.common import triton_interpreted

STATE_ROWS = (COUNT, SUM_HI, SUM_LO, COUNT_PESS, SUM_HI_PESS, SUM_LO_PESS)
LAYOUT = STATE_LAYOUT.kernel_constants()
ON_GPU = torch.cuda.is_available()


def _kernels():
    names = ["cpu"] if _ext.has_cpu_kernel() else []
    if importlib.util.find_spec("triton") is not None and (ON_GPU or triton_interpreted()):
        names.append("triton")
    if ON_GPU and _ext.has_cuda_kernel():
        names.append("cuda")
    return names


KERNELS = _kernels()
TRITON = [k for k in KERNELS if k == "triton"]
GPU_STYLE = [k for k in KERNELS if k != "cpu"]  # the kernels with the flags-and-atomics contract


def device_of(kernel):
    return torch.device("cpu") if kernel == "cpu" or not ON_GPU else torch.device("cuda")


def run_token_stats(kernel, logits, targets, n_cols=None, target_logit=None, ignore_index=-100):
    """(rank, ties, logp, non-finite info): the first non-finite row on cpu, flags elsewhere."""
    n_cols = logits.shape[-1] if n_cols is None else n_cols
    if kernel == "cpu":
        return _ext.cpu_token_stats(logits, targets, ignore_index, n_cols, target_logit=target_logit)
    if kernel == "cuda":
        return _ext.cuda_token_stats(logits, targets, ignore_index, n_cols, target_logit=target_logit)
    from rankops.ops import token_stats_triton
    return token_stats_triton.launch(logits, targets, ignore_index, n_cols, target_logit=target_logit)


def run_accumulate(kernel, logits, targets, stats, n_cols=None):
    n_cols = logits.shape[-1] if n_cols is None else n_cols
    if kernel == "cpu":
        return _ext.cpu_accumulate(logits, targets, stats, -100, n_cols, False, False)
    if kernel == "cuda":
        return _ext.cuda_token_stats(logits, targets, -100, n_cols, stats=stats)
    from rankops.ops import token_stats_triton
    return token_stats_triton.launch(logits, targets, -100, n_cols, stats=stats, **LAYOUT)


def run_softmax_grad(kernel, logits, targets, lse, scale, n_cols):
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if kernel == "cpu":
        _ext.cpu_softmax_grad(logits, targets, lse, scale, -100, n_cols, grad)
    elif kernel == "cuda":
        _ext.cuda_softmax_grad(logits, targets, lse, scale, -100, n_cols, grad)
    else:
        from rankops.ops import softmax_grad_triton
        softmax_grad_triton.launch(logits, targets, lse, scale, -100, n_cols, grad)
    return grad


def random_logits(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


# --- external target-logit mode ----------------------------------------------------------------

def external_reference(shard, n_cols, targets, target_logit, ignore_index=-100):
    """The definitions of the external mode, in float64: rank = #{v < n_cols : z_v > z_t},
    ties = #{v < n_cols : z_v == z_t} (raw), logp = z_t - logsumexp(z[:n_cols])."""
    z = shard[..., :n_cols].double()
    z_t = target_logit.double()
    kept = targets != ignore_index
    rank = (z > z_t[..., None]).sum(-1)
    ties = (z == z_t[..., None]).sum(-1)
    logp = z_t - torch.logsumexp(z, -1)
    return (torch.where(kept, rank, -1), torch.where(kept, ties, 0),
            torch.where(kept, logp, 0.0))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_external_target_logit_matches_definitions(kernel, dtype):
    # A 1000-token vocabulary padded to 1024 columns, split into shards [0, 400) and [400, 1024)
    # of which the second counts 600 columns. bf16 and fp16 logits tie often.
    device = device_of(kernel)
    n_rows, n_vocab = 12, 1000
    full = random_logits((n_rows, 1024), dtype, device)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=torch.Generator().manual_seed(1)).to(device)
    targets[0], targets[1] = 3, 997  # one target in each shard for sure
    target_logit = full[torch.arange(n_rows, device=device), targets].float()
    passed = targets.clone()
    passed[2] = -100          # ignored
    passed[3] = -7            # kept: the index is neither checked nor read
    passed[4] = 10 ** 12
    shards = [(full[:, :400], 400), (full[:, 400:], 600)]  # strided views, not copies
    for shard, n_cols in shards:
        rank, ties, logp, _ = run_token_stats(kernel, shard, passed, n_cols, target_logit)
        want_rank, want_ties, want_logp = external_reference(shard, n_cols, passed, target_logit)
        assert torch.equal(rank.cpu(), want_rank.cpu())
        assert torch.equal(ties.cpu(), want_ties.cpu())
        torch.testing.assert_close(logp.double().cpu(), want_logp.cpu(), rtol=1e-6, atol=2e-6)
    assert int(run_token_stats(kernel, shards[1][0], passed, 600, target_logit)[0][2]) == -1


@pytest.mark.parametrize("kernel", KERNELS)
def test_external_shards_add_up_to_the_full_row(kernel):
    # What vocabulary-parallel statistics rely on: per-shard ranks add up to the full rank,
    # raw ties to the full ties plus the target itself, and the shards' logsumexps merge.
    device = device_of(kernel)
    full = random_logits((9, 700), torch.bfloat16, device, seed=3)
    targets = torch.randint(0, 700, (9,), generator=torch.Generator().manual_seed(4)).to(device)
    rank, ties, logp, _ = run_token_stats(kernel, full, targets)
    target_logit = full[torch.arange(9, device=device), targets].float()
    parts = [run_token_stats(kernel, full[:, a:b], targets, b - a, target_logit)
             for a, b in ((0, 250), (250, 300), (300, 700))]
    assert torch.equal(sum(p[0] for p in parts), rank)
    assert torch.equal(sum(p[1] for p in parts), ties + 1)
    lse = torch.logsumexp(torch.stack([target_logit.double() - p[2].double() for p in parts]), 0)
    torch.testing.assert_close(target_logit.double() - lse, logp.double(), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_external_target_logit_on_every_cpu_isa(cpu_isa, dtype):
    # Each instruction set has its own build of the CPU kernel; 20000 columns take two slices.
    shard = random_logits((5, 20000), dtype, "cpu", seed=13)[:, 7:]
    targets = torch.tensor([0, -100, 5, 10 ** 9, -3])
    target_logit = shard[:, 11].float().contiguous()
    rank, ties, logp, _ = _ext.cpu_token_stats(shard, targets, -100, 19990, target_logit)
    want_rank, want_ties, want_logp = external_reference(shard, 19990, targets, target_logit)
    assert torch.equal(rank, want_rank) and torch.equal(ties, want_ties)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_external_target_logit_nonfinite_flag(kernel):
    device = device_of(kernel)
    shard = random_logits((4, 64), torch.float32, device)
    shard[1, 10] = float("nan")
    targets = torch.tensor([0, 1, -100, 3], device=device)
    target_logit = torch.zeros(4, device=device)
    _, _, _, info = run_token_stats(kernel, shard, targets, target_logit=target_logit)
    if kernel == "cpu":
        assert info == 1
    else:
        assert info.tolist() == [0, 1, 0, 0]


# --- CPU accumulation with leave_out ---------------------------------------------------------

def leave_out_case():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(40, 97, generator=g) * 2).to(torch.bfloat16)  # bf16: many ties
    targets = torch.randint(0, 97, (40,), generator=g)
    targets[[3, 30]] = -100
    logits[7, 20] = float("nan")                  # logp NaN
    logits[12, :] = -3e7                          # |logp| >= 2^23: cannot be accumulated
    logits[12, 0] = 3e7
    targets[12] = 1
    logits[21, 5] = float("-inf")                 # non-finite logit, finite logp: added
    return logits, targets


def test_leave_out_skips_and_counts_what_cannot_be_accumulated():
    logits, targets = leave_out_case()
    stats = torch.zeros(6, 97, dtype=torch.int64)
    info = _ext.cpu_accumulate(logits, targets, stats, -100, 97, False, True)
    rank, ties, logp, _ = _ext.cpu_token_stats(logits, targets, -100, 97)
    ok = (rank >= 0) & (logp.abs() < LOGP_LIMIT)
    want = RankAccumulator(97)
    want.update_stats(torch.where(ok, rank, -1), torch.where(ok, logp, 0.0), torch.where(ok, ties, 0))
    assert torch.equal(stats, want.stats)
    n_tied = int((ok & (ties > 0)).sum())
    assert n_tied > 0
    assert info == (7, 7, n_tied, 2)  # first non-finite row, first bad logp row, n_tied, n_skipped


def test_without_leave_out_nothing_is_added():
    logits, targets = leave_out_case()
    stats = torch.zeros(6, 97, dtype=torch.int64)
    info = _ext.cpu_accumulate(logits, targets, stats, -100, 97, False, False)
    assert info[1] == 7 and info[3] == 0
    assert not stats.any()
    with pytest.raises(ValueError, match="check_finite"):
        _ext.cpu_accumulate(logits, targets, stats, -100, 97, True, True)


def test_accumulate_returns_a_carry_normalised_state():
    # A state merged from GPU atomics may hold lo words past 2^32; every bin comes back with
    # lo in [0, 2^32) and the same value hi * 2^32 + lo.
    logits = random_logits((16, 50), torch.float32, "cpu")
    targets = torch.arange(16)
    stats = torch.zeros(6, 50, dtype=torch.int64)
    stats[SUM_LO, :] = 3 * 2 ** 32 + 11
    stats[SUM_LO_PESS, :] = -(2 ** 32) + 5
    want = stats.clone()
    rank, ties, logp, _ = _ext.cpu_token_stats(logits, targets, -100, 50)
    acc = RankAccumulator(50)
    acc.stats.copy_(want)
    acc.update_stats(rank, logp, ties)  # adds, then normalises
    _ext.cpu_accumulate(logits, targets, stats, -100, 50, False, True)
    for hi, lo in ((SUM_HI, SUM_LO), (SUM_HI_PESS, SUM_LO_PESS)):
        assert bool(((stats[lo] >= 0) & (stats[lo] < 2 ** 32)).all())
    assert torch.equal(stats, acc.stats)


def test_bad_target_raises_and_adds_nothing():
    logits = random_logits((2, 3, 10), torch.float32, "cpu")
    targets = torch.tensor([[1, 2, -100], [4, 10, 0]])
    stats = torch.zeros(6, 10, dtype=torch.int64)
    message = r"targets must lie in \[0, 10\) or equal ignore_index=-100; found 10 at position \(1, 1\)"
    with pytest.raises(ValueError, match=message):
        _ext.cpu_accumulate(logits, targets, stats, -100, 10, True, False)
    assert not stats.any()
    with pytest.raises(ValueError, match=message):
        _ext.cpu_token_stats(logits, targets, -100, 10)
    grad = torch.empty_like(logits)
    lse, scale = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"found 10 at position \(1, 1\)"):
        _ext.cpu_softmax_grad(logits, targets, lse, scale, -100, 10, grad)


# --- N-d strided logits, read in place ------------------------------------------------------

def strided_views(dtype, device):
    """name -> a non-contiguous view, each a case the kernels must walk without a copy."""
    base = random_logits((3, 6, 301), dtype, device, seed=7)
    wide = random_logits((2, 3, 4, 2 * 301), dtype, device, seed=8)
    return {
        "shifted [B, T-1, V] of [B, T, V]": base[:, :-1],
        "transposed [T, B, V]": base.transpose(0, 1),
        "3 leading dims, permuted": wide[..., :301].permute(2, 0, 1, 3),
        "column stride 2": wide[:, 1:, :, ::2],
        # More leading dims than the C++ kernels walk: _ext flattens them (Triton walks all 9).
        "9 leading dims": base[:, :4].reshape(3, 1, 2, 1, 2, 1, 1, 1, 1, 301),
    }


def targets_for(view, seed=9):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, view.shape[-1], view.shape[:-1], generator=g)
    t.view(-1)[::5] = -100
    return t.to(view.device)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_token_stats_equal_the_contiguous_copy(kernel, dtype):
    for name, view in strided_views(dtype, device_of(kernel)).items():
        targets = targets_for(view)
        got = run_token_stats(kernel, view, targets, n_cols=300)
        want = run_token_stats(kernel, view.contiguous(), targets, n_cols=300)
        for a, b in zip(got[:3], want[:3]):
            assert a.shape == targets.shape, name
            assert torch.equal(a, b), name
        assert (got[3] == want[3]) if kernel == "cpu" else torch.equal(got[3], want[3]), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_external_target_logit_equals_the_contiguous_copy(kernel):
    view = strided_views(torch.bfloat16, device_of(kernel))["transposed [T, B, V]"]
    targets = targets_for(view)
    target_logit = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(view.device)
    got = run_token_stats(kernel, view, targets, target_logit=target_logit)
    want = run_token_stats(kernel, view.contiguous(), targets, target_logit=target_logit)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_accumulate_equals_the_contiguous_copy(kernel):
    for name, view in strided_views(torch.bfloat16, device_of(kernel)).items():
        targets = targets_for(view)
        got = torch.zeros(6, 301, dtype=torch.int64, device=view.device)
        want = torch.zeros_like(got)
        run_accumulate(kernel, view, targets, got, n_cols=300)
        run_accumulate(kernel, view.contiguous(), targets, want, n_cols=300)
        assert torch.equal(got, want), name
        assert int(got[COUNT].sum()) == int((targets != -100).sum()), name


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_softmax_grad_equals_the_contiguous_copy(kernel, dtype):
    for name, view in strided_views(dtype, device_of(kernel)).items():
        targets = targets_for(view)
        lse = torch.logsumexp(view[..., :300].float(), -1).contiguous()
        scale = torch.rand(targets.shape, generator=torch.Generator().manual_seed(3)).to(view.device)
        got = run_softmax_grad(kernel, view, targets, lse, scale, 300)
        want = run_softmax_grad(kernel, view.contiguous(), targets, lse, scale, 300)
        assert torch.equal(got, want), name
        assert not got[targets == -100].any(), name


def test_strided_case_spans_several_slices_on_cpu():
    # 40000 columns: three CPU slices of 16384 merged in order, and the per-(row, slice) split
    # used for few rows, on a transposed view.
    base = random_logits((2, 3, 40000), torch.bfloat16, "cpu", seed=11)
    view = base.transpose(0, 1)
    targets = targets_for(view)
    got = _ext.cpu_token_stats(view, targets, -100, 40000)
    want = _ext.cpu_token_stats(view.contiguous(), targets, -100, 40000)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


# --- the accumulator's layout belongs to the caller (Triton) ---------------------------------

@pytest.mark.parametrize("kernel", TRITON)
def test_triton_accumulation_needs_the_layout(kernel):
    from rankops.ops import token_stats_triton
    logits = random_logits((4, 30), torch.float32, device_of(kernel))
    targets = torch.arange(4, device=logits.device)
    stats = torch.zeros(6, 30, dtype=torch.int64, device=logits.device)
    for missing in ("rows", "logp_scale", "logp_limit"):
        layout = {k: v for k, v in LAYOUT.items() if k != missing}
        with pytest.raises(TypeError, match=missing):
            token_stats_triton.launch(logits, targets, -100, 30, stats=stats, **layout)
    with pytest.raises(ValueError, match="target_logit"):
        token_stats_triton.launch(logits, targets, -100, 30, stats=stats,
                                  target_logit=torch.zeros(4, device=logits.device), **LAYOUT)
    assert not stats.any()


@pytest.mark.parametrize("kernel", TRITON)
def test_triton_accumulation_follows_the_given_layout(kernel):
    from rankops.ops import token_stats_triton
    device = device_of(kernel)
    logits = random_logits((24, 40), torch.bfloat16, device, seed=12)
    targets = targets_for(logits)
    standard = torch.zeros(6, 40, dtype=torch.int64, device=device)
    token_stats_triton.launch(logits, targets, -100, 40, stats=standard, **LAYOUT)
    # Permuted rows: the same words land where the caller says.
    rows = (4, 0, 5, 2, 1, 3)
    permuted = torch.zeros_like(standard)
    token_stats_triton.launch(logits, targets, -100, 40, stats=permuted, rows=rows,
                              logp_scale=LOGP_SCALE, logp_limit=LOGP_LIMIT)
    assert torch.equal(permuted[list(rows)], standard)
    # Another scale and limit: q = floor(logp * 2^20 + 1/2), tokens with |logp| >= 4 left out.
    rank, _, logp, _ = token_stats_triton.launch(logits, targets, -100, 40)
    other = torch.zeros_like(standard)
    token_stats_triton.launch(logits, targets, -100, 40, stats=other, rows=STATE_ROWS,
                              logp_scale=2.0 ** 20, logp_limit=4.0)
    ok = (rank >= 0) & (logp.abs() < 4.0)
    assert 0 < int(ok.sum()) < int((rank >= 0).sum())
    assert int(other[COUNT].sum()) == int(ok.sum())
    q = torch.floor(logp[ok].double() * 2.0 ** 20 + 0.5).to(torch.int64)
    assert int(other[SUM_HI].sum()) * 2 ** 32 + int(other[SUM_LO].sum()) == int(q.sum())


def test_triton_module_spells_no_layout_constant_and_imports_no_accumulator():
    # The layout has one Python owner; the Triton module gets it from its caller. Also no import
    # of the accumulator, anywhere in the module (functions included): no import cycle.
    from rankops.ops import token_stats_triton
    tree = ast.parse(inspect.getsource(token_stats_triton))
    forbidden = {2 ** 40, 2 ** 23}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            assert node.value not in forbidden, f"layout constant {node.value} at line {node.lineno}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            assert ast.literal_eval(node.right) not in (40, 23), f"2 ** n at line {node.lineno}"
        if isinstance(node, ast.ImportFrom):
            assert "accumulate" not in (node.module or ""), f"import at line {node.lineno}"
            assert all("accumulate" not in a.name for a in node.names), f"import at line {node.lineno}"
        if isinstance(node, ast.Import):
            assert all("accumulate" not in a.name for a in node.names), f"import at line {node.lineno}"


# --- the binding's checks and the ISA functions ----------------------------------------------

def test_binding_refuses_what_would_corrupt_memory():
    C = _ext.require()
    logits = torch.zeros(4, 10)
    targets = torch.zeros(4, dtype=torch.int64)
    out = [torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64), torch.empty(4)]
    z = C.Logits(data=logits.data_ptr(), dtype=0, shape=[4, 10], strides=[10, 1], n_cols=10)
    with pytest.raises(ValueError, match="null"):
        C.token_stats(logits=z, targets=0, ignore_index=-100, rank=out[0].data_ptr(),
                      ties=out[1].data_ptr(), logp=out[2].data_ptr())
    with pytest.raises(ValueError, match="n_cols"):
        C.Logits(data=logits.data_ptr(), dtype=0, shape=[4, 10], strides=[10, 1], n_cols=11)
    with pytest.raises(ValueError, match="dims"):
        C.Logits(data=logits.data_ptr(), dtype=0, shape=[1] * 10 + [10], strides=[10] * 11, n_cols=10)
    with pytest.raises(ValueError, match="shorter"):
        _ext.cpu_accumulate(logits, targets, torch.zeros(6, 9, dtype=torch.int64), -100, 10, False, False)
    with pytest.raises(ValueError, match="targets"):
        _ext.cpu_token_stats(logits, targets[:3], -100, 10)
    with pytest.raises(ValueError, match="target_logit"):
        _ext.cpu_token_stats(logits, targets, -100, 10, target_logit=torch.zeros(4, dtype=torch.float64))
    # The fused output layer's block steps take caller-owned buffers: null ones are refused.
    zt = torch.zeros(4)
    slices = torch.empty(4 * C.partial_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_partials needs target_logit"):
        C.block_partials(logits=z, target_logit=0, slices=slices.data_ptr())
    with pytest.raises(ValueError, match="fold_partials: null buffer"):
        C.fold_partials(running=0, slices=slices.data_ptr(), n_rows=4, n_slices=1, started=False)
    with pytest.raises(ValueError, match="finish_partials: null buffer"):
        C.finish_partials(running=slices.data_ptr(), target_logit=zt.data_ptr(), n_rows=4, rank=0,
                          ties=out[1].data_ptr(), logp=out[2].data_ptr())


def test_isa_functions():
    isas = _ext.cpu_compiled_isas()
    assert "baseline" in isas and _ext.cpu_isa() in isas
    assert _ext.cpu_isa_supported("baseline") and not _ext.cpu_isa_supported("no-such-isa")
    with pytest.raises(ValueError):
        _ext.set_cpu_isa("no-such-isa")
    _ext.set_cpu_isa("baseline")
    try:
        assert _ext.cpu_isa() == "baseline"
    finally:
        _ext.set_cpu_isa("auto")
    assert _ext.cpu_isa() == isas[[_ext.cpu_isa_supported(n) for n in isas].index(True)]
