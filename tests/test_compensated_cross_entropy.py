"""compensated_cross_entropy: L = CE + lam * Conf, its gradient, and its transformers adapter.

The truth is an independent float64 implementation of the formulas in docs/DESIGN.md (loss) and in
rankops/loss.py (per-token terms): ranks by direct comparison, P, Q and Z by a Python loop over
the ranks. Finite differences (torch.autograd.gradcheck, float64) check that the analytic
gradient is the derivative of the value.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rankops
from rankops.loss import RunningRankStats, rank_ratio

from conftest import runs_on_host

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_case(n_rows, n_vocab, dtype=torch.float32, *, seed=0, ignore_frac=0.2, scale=3.0,
              device="cpu", lead=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n_rows, n_vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, n_vocab, (n_rows,), generator=g)
    # Make low ranks common, as in a trained model, so P and Q have structure.
    top = logits.double().argmax(-1)
    targets = torch.where(torch.rand(n_rows, generator=g) < 0.4, top, targets)
    targets[torch.rand(n_rows, generator=g) < ignore_frac] = -100
    if lead is not None:
        logits, targets = logits.view(*lead, n_vocab), targets.view(*lead)
    return logits.to(device), targets.to(device)


def truth(logits, targets, lam, ignore_index=-100, vocab_size=None, min_weight=None):
    """float64 (loss value, per-token terms [N], weights [N], gradient of the mean loss [N, V])."""
    n_vocab = logits.shape[-1]
    n_cols = n_vocab if vocab_size is None else vocab_size
    z_raw = logits.detach().reshape(-1, n_vocab)[:, :n_cols].cpu()
    z = z_raw.double()
    t = targets.reshape(-1).cpu()
    keep = t != ignore_index
    rows = torch.nonzero(keep).flatten().tolist()
    rank, logp = {}, {}
    for i in rows:
        rank[i] = int((z[i] > z[i, t[i]]).sum())
        logp[i] = float(z[i, t[i]] - torch.logsumexp(z[i], 0))
    n = len(rows)
    groups = {}
    for i in rows:
        groups.setdefault(rank[i], []).append(logp[i])
    log_s = {k: math.fsum(v) / len(v) for k, v in groups.items()}
    m = max(log_s.values())
    log_z = m + math.log(math.fsum(math.exp(s - m) for s in log_s.values()))
    log_q = {k: s - log_z for k, s in log_s.items()}
    ratio = {k: math.exp(log_q[k]) / (len(groups[k]) / n) for k in groups}
    ce = -math.fsum(logp.values()) / n
    loss = ce + lam * log_z
    per_token = torch.zeros(len(t), dtype=torch.float64)
    weight = torch.zeros(len(t), dtype=torch.float64)
    grad = torch.zeros(len(t), n_vocab, dtype=torch.float64)
    for i in rows:
        k = rank[i]
        per_token[i] = -logp[i] + lam * ratio[k] * (logp[i] - log_q[k])
        w = 1.0 - lam * ratio[k]
        weight[i] = w if min_weight is None else max(w, min_weight)
        p = torch.softmax(z[i], 0)
        p[t[i]] -= 1.0
        grad[i, :n_cols] = weight[i] * p / n
    return loss, per_token, weight, grad.view(logits.shape)


def run(logits, targets, lam, backend, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = rankops.compensated_cross_entropy(x, targets, lam, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def value_tol(dtype):
    # logp comes from the kernels in fp32: a few ulp of |logp| (about 1e-6 relative).
    return dict(rtol=2e-6, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)


def assert_grad_close(got, want, dtype):
    """fp32: a few ulp of the largest element (exp and the recovered lse are good to ~1e-6
    relative). 16-bit outputs: the float64 truth rounded once to the dtype, or one ulp from it
    (the fp32 computation may land on the other side of a rounding boundary)."""
    want = want.to(got.device)
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    elif got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    else:
        eps = torch.finfo(got.dtype).eps  # relative size of one ulp (between 2^-m and 2^-m+1)
        tiny = torch.finfo(got.dtype).smallest_normal if got.dtype == torch.bfloat16 else 2.0 ** -24
        torch.testing.assert_close(got.double(), want, rtol=eps, atol=tiny * float(want.abs().max()) + 2 * tiny)


# ---------------------------------------------------------------------------------------------
# Value and gradient against the float64 truth
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.5])
def test_value_and_gradient_match_truth(backend, device, dtype, lam):
    logits, targets = make_case(48, 301, dtype, device=device)
    loss, grad = run(logits, targets, lam, backend)
    want_loss, _, _, want_grad = truth(logits, targets, lam)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert float(loss) == pytest.approx(want_loss, rel=2e-6, abs=1e-6)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_grad_close(grad, want_grad, dtype)


def test_float64_matches_truth_exactly():
    logits, targets = make_case(40, 57, torch.float64)
    loss, grad = run(logits, targets, 0.7, "torch")
    want_loss, _, _, want_grad = truth(logits, targets, 0.7)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want_loss, rel=1e-13)
    assert_grad_close(grad, want_grad, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lam", [0.4, 2.0])
def test_gradient_is_the_derivative_of_the_value(reduction, lam):
    # Central finite differences of the float64 value against the analytic backward. Ranks do
    # not move under the 1e-6 perturbation: the logits are at least 1e-3 apart.
    logits, targets = make_case(14, 9, torch.float64, seed=3, ignore_frac=0.15)
    x = logits.clone().requires_grad_(True)

    def f(z):
        out = rankops.compensated_cross_entropy(z, targets, lam, reduction=reduction, backend="torch")
        return out.sum() if reduction == "none" else out   # none: the terms' sum is the loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lam_zero_is_cross_entropy(backend, device):
    for dtype in KERNEL_DTYPES:
        logits, targets = make_case(2 * 3 * 5, 211, dtype, device=device, lead=(2, 3, 5))
        for reduction in ("mean", "sum", "none"):
            x = logits.detach().float().clone().requires_grad_(True)
            want = F.cross_entropy(x.view(-1, 211), targets.view(-1), reduction=reduction)
            want.sum().backward()
            loss, grad = run(logits, targets, 0.0, backend, reduction=reduction)
            torch.testing.assert_close(loss.view(-1), want.detach().view(-1), rtol=2e-6, atol=2e-6)
            if dtype == torch.float32:
                torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6 * float(x.grad.abs().max()))
            else:  # F.cross_entropy's fp32 gradient, rounded to the 16-bit dtype
                assert_grad_close(grad, x.grad.double(), dtype)


def test_every_backend_matches_the_reference(backend, device):
    logits, targets = make_case(33, 517, torch.bfloat16, device=device, seed=5)
    for lam in (0.25, 1.0):
        loss, grad = run(logits, targets, lam, backend)
        ref_loss, ref_grad = run(logits.cpu(), targets.cpu(), lam, "torch")
        assert float(loss) == pytest.approx(float(ref_loss), rel=2e-6, abs=1e-6)
        assert_grad_close(grad.cpu(), ref_grad.double(), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# ignore_index, vocab_size, one rank, negative weights, reductions, num_items_in_batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_ignore_index(backend, device, ignore_index):
    logits, targets = make_case(40, 64, device=device, seed=8, ignore_frac=0.0)
    targets[::3] = ignore_index
    loss, grad = run(logits, targets, 0.5, backend, ignore_index=ignore_index)
    want_loss, _, _, want_grad = truth(logits, targets, 0.5, ignore_index=ignore_index)
    assert float(loss) == pytest.approx(want_loss, rel=2e-6, abs=1e-6)
    assert torch.equal(grad[::3], torch.zeros_like(grad[::3]))      # ignored rows: exact zeros
    assert_grad_close(grad, want_grad, torch.float32)
    # Ignored rows' logits do not matter, even when huge.
    changed = logits.clone()
    changed[::3] = 1e4
    loss2, grad2 = run(changed, targets, 0.5, backend, ignore_index=ignore_index)
    assert float(loss2) == float(loss)
    assert torch.equal(grad2[1::3], grad[1::3])


def test_vocab_size_padding_gets_zero_gradient(backend, device):
    logits, targets = make_case(24, 100, device=device, seed=9)
    targets = torch.where(targets >= 90, 89, targets)
    targets[targets == 89] = -100
    logits[:, 90:] = 50.0  # padded columns would dominate the softmax if they counted
    loss, grad = run(logits, targets, 0.6, backend, vocab_size=90)
    want_loss, _, _, want_grad = truth(logits, targets, 0.6, vocab_size=90)
    assert float(loss) == pytest.approx(want_loss, rel=2e-6)
    assert torch.equal(grad[:, 90:], torch.zeros_like(grad[:, 90:]))
    assert_grad_close(grad, want_grad, torch.float32)


def test_all_tokens_of_one_rank(backend, device):
    # Every target is its row's argmax: P = Q = 1 at rank 0, so Conf = mean logp = -CE,
    # L = (1 - lam) CE, and every weight is 1 - lam.
    logits, _ = make_case(30, 50, device=device, seed=10)
    targets = logits.argmax(-1)
    lam = 0.35
    loss, grad = run(logits, targets, lam, backend)
    ce_loss, ce_grad = run(logits, targets, 0.0, backend)
    assert float(loss) == pytest.approx((1 - lam) * float(ce_loss), rel=2e-6)
    torch.testing.assert_close(grad, (1 - lam) * ce_grad, rtol=1e-5, atol=1e-9)


def test_negative_weights_and_min_weight(backend, device):
    logits, targets = make_case(64, 40, device=device, seed=11)
    lam = 3.0
    _, _, weight, _ = truth(logits, targets, lam)
    assert (weight < 0).any() and (weight > 0).any()   # the case exercises both signs
    loss, grad = run(logits, targets, lam, backend)
    assert_grad_close(grad, truth(logits, targets, lam)[3], torch.float32)
    clipped_loss, clipped = run(logits, targets, lam, backend, min_weight=0.0)
    assert float(clipped_loss) == float(loss)            # the clip changes the gradient only
    _, _, want_w, want_grad = truth(logits, targets, lam, min_weight=0.0)
    negative = (weight < 0).to(device)
    assert torch.equal(clipped[negative], torch.zeros_like(clipped[negative]))
    assert_grad_close(clipped, want_grad, torch.float32)


def test_reductions_agree(backend, device):
    logits, targets = make_case(50, 77, device=device, seed=12)
    lam = 0.8
    per_token, g_none = run(logits, targets, lam, backend, reduction="none")
    total, g_sum = run(logits, targets, lam, backend, reduction="sum")
    mean, g_mean = run(logits, targets, lam, backend, reduction="mean")
    _, want_terms, _, _ = truth(logits, targets, lam)
    n_kept = int((targets != -100).sum())
    assert per_token.shape == targets.shape and per_token.dtype == torch.float32
    assert torch.equal(per_token[targets == -100], torch.zeros_like(per_token[targets == -100]))
    torch.testing.assert_close(per_token.double().cpu(), want_terms, rtol=1e-5, atol=1e-5)
    assert float(total) == pytest.approx(float(per_token.double().sum()), rel=1e-6)
    assert float(mean) == pytest.approx(float(total) / n_kept, rel=1e-6)
    torch.testing.assert_close(g_none, g_sum, rtol=0, atol=0)
    torch.testing.assert_close(g_mean, g_sum / n_kept, rtol=1e-6, atol=1e-12)


def test_none_backward_takes_per_token_upstream_gradients():
    # With P and Q held fixed, d(sum_i g_i l_i)/dz_i = g_i w_i (softmax - onehot).
    logits, targets = make_case(20, 30, torch.float64, seed=13)
    x = logits.clone().requires_grad_(True)
    g = torch.linspace(-1.0, 2.0, 20, dtype=torch.float64)
    (rankops.compensated_cross_entropy(x, targets, 0.6, reduction="none", backend="torch") * g).sum().backward()
    _, _, weight, grad_mean = truth(logits, targets, 0.6)
    n = int((targets != -100).sum())
    keep = weight != 0
    want = grad_mean * n / torch.where(keep, weight, 1.0)[:, None] * (g * weight)[:, None]
    torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(backend, device, as_tensor):
    logits, targets = make_case(36, 45, device=device, seed=14)
    lam = 0.5
    total, g_sum = run(logits, targets, lam, backend, reduction="sum")
    num = torch.tensor(100, device=device) if as_tensor else 100
    loss, grad = run(logits, targets, lam, backend, num_items_in_batch=num)
    assert float(loss) == pytest.approx(float(total) / 100, rel=1e-6)
    torch.testing.assert_close(grad, g_sum / 100, rtol=1e-6, atol=1e-12)
    loss_sum, _ = run(logits, targets, lam, backend, reduction="sum", num_items_in_batch=num)
    assert float(loss_sum) == pytest.approx(float(loss), rel=1e-12)


def test_gradient_accumulation_with_num_items_equals_one_batch_at_lam_zero():
    logits, targets = make_case(60, 80, seed=15)
    targets[:30][torch.arange(30) % 2 == 0] = -100    # micro-batches with unequal kept tokens
    n_items = int((targets != -100).sum())
    x = logits.clone().requires_grad_(True)
    for part in (slice(0, 30), slice(30, 60)):
        rankops.compensated_cross_entropy(x[part], targets[part], 0.0, num_items_in_batch=n_items).backward()
    y = logits.clone().requires_grad_(True)
    F.cross_entropy(y, targets).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-9)


def test_logits_are_not_written():
    logits, targets = make_case(20, 300, torch.bfloat16, seed=16)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    rankops.compensated_cross_entropy(x, targets, 0.5, backend="cpu").backward()
    assert torch.equal(x.detach(), before)


def test_strided_logits(backend, device):
    base, targets = make_case(3 * 9, 130, device=device, seed=17, lead=(3, 9))
    shifted = base[:, :-1, :]                            # a causal LM's shift: not contiguous
    t = targets[:, 1:]
    loss, grad = run(shifted, t, 0.4, backend)
    want_loss, _, _, want_grad = truth(shifted.contiguous(), t.contiguous(), 0.4)
    assert float(loss) == pytest.approx(want_loss, rel=2e-6, abs=1e-6)
    assert_grad_close(grad, want_grad, torch.float32)


# ---------------------------------------------------------------------------------------------
# Running estimate
# ---------------------------------------------------------------------------------------------

def test_running_with_decay_zero_is_the_batch():
    logits, targets = make_case(40, 60, seed=18)
    running = RunningRankStats(60, decay=0.0)
    for _ in range(2):
        loss, grad = run(logits, targets, 0.7, "cpu", running=running)
    want_loss, want_grad = run(logits, targets, 0.7, "cpu")
    assert float(loss) == float(want_loss)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert running.n_updates == 2


def test_running_weights_follow_the_decayed_statistics():
    a_logits, a_targets = make_case(50, 40, seed=19)
    b_logits, b_targets = make_case(50, 40, seed=20)
    decay, lam = 0.9, 0.6
    running = RunningRankStats(40, decay=decay)
    run(a_logits, a_targets, lam, "torch", running=running)
    loss, grad = run(b_logits, b_targets, lam, "torch", running=running)
    # The weights, by hand: decayed per-rank sums of both batches.
    count = torch.zeros(40, dtype=torch.float64)
    sums = torch.zeros(40, dtype=torch.float64)
    for scale, (z, t) in ((decay, (a_logits, a_targets)), (1.0, (b_logits, b_targets))):
        s = rankops.token_stats(z, t, backend="torch")
        keep = s.rank >= 0
        count.index_add_(0, s.rank[keep], torch.full((int(keep.sum()),), scale, dtype=torch.float64))
        sums.index_add_(0, s.rank[keep], scale * s.logp[keep].double())
    torch.testing.assert_close(running.count, count, rtol=1e-15, atol=0)
    seen = count > 0
    log_s = torch.where(seen, sums / count.clamp_min(1e-300), float("-inf"))
    q = torch.exp(log_s - torch.logsumexp(log_s, 0))
    p = count / count.sum()
    s_b = rankops.token_stats(b_logits, b_targets, backend="torch")
    keep = s_b.rank >= 0
    w = torch.where(keep, 1 - lam * (q / p.clamp_min(1e-300))[s_b.rank.clamp_min(0)], 0.0)
    softmax = torch.softmax(b_logits.double(), -1)
    softmax[torch.arange(50), b_targets.clamp_min(0)] -= 1
    want = (w / int(keep.sum()))[:, None] * softmax
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-8)
    # The value stays the batch's own.
    assert float(loss) == pytest.approx(truth(b_logits, b_targets, lam)[0], rel=1e-6)


def test_running_state_dict_round_trip():
    logits, targets = make_case(30, 20, seed=21)
    running = RunningRankStats(20, decay=0.5)
    run(logits, targets, 0.3, "cpu", running=running)
    other = RunningRankStats(20)
    other.load_state_dict(running.state_dict())
    assert torch.equal(other.count, running.count) and torch.equal(other.sum_logp, running.sum_logp)
    assert other.decay == 0.5 and other.n_updates == 1
    with pytest.raises(ValueError, match="vocab_size"):
        RunningRankStats(21).load_state_dict(running.state_dict())


def test_module_keeps_running_state_in_its_state_dict():
    logits, targets = make_case(30, 20, seed=22)
    crit = rankops.CompensatedCrossEntropy(0.3, weights="running", vocab_size=20, decay=0.5)
    x = logits.clone().requires_grad_(True)
    crit(x, targets).backward()
    state = crit.state_dict()
    assert torch.equal(state["running_count"], crit.running.count)
    assert float(state["running_count"].sum()) == int((targets != -100).sum())
    fresh = rankops.CompensatedCrossEntropy(0.3, weights="running", vocab_size=20, decay=0.5)
    fresh.load_state_dict(state)
    y = logits.clone().requires_grad_(True)
    crit(x.detach().requires_grad_(True), targets)
    fresh(y, targets).backward()
    assert torch.equal(fresh.running.count, crit.running.count)
    assert "lam=0.3" in repr(crit)


def test_rank_ratio_averages_to_one():
    count = torch.tensor([5.0, 0.0, 3.0, 2.0], dtype=torch.float64)
    sums = torch.tensor([-1.0, 0.0, -6.0, -9.0], dtype=torch.float64)
    log_q, ratio = rank_ratio(count, sums)
    assert float((ratio * count).sum() / count.sum()) == pytest.approx(1.0, rel=1e-15)
    assert log_q[1] == float("-inf") and ratio[1] == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lam="0.1"), TypeError, "lam"),
    (dict(lam=float("nan")), ValueError, "lam"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction="none", num_items_in_batch=5), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=2.5), TypeError, "num_items_in_batch"),
    (dict(running=RunningRankStats(11)), ValueError, "running"),
    (dict(running="yes"), TypeError, "running"),
    (dict(min_weight="0"), TypeError, "min_weight"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_options_raise(kwargs, error, match):
    logits, targets = make_case(4, 10)
    kwargs = {"lam": 0.1, **kwargs}
    lam = kwargs.pop("lam")
    with pytest.raises(error, match=match):
        rankops.compensated_cross_entropy(logits, targets, lam, **kwargs)


def test_bad_tensors_raise():
    logits, targets = make_case(4, 10, ignore_frac=0.0)
    with pytest.raises(ValueError, match="targets"):
        rankops.compensated_cross_entropy(logits, torch.full((4,), 10), 0.1)
    with pytest.raises(TypeError, match="targets"):
        rankops.compensated_cross_entropy(logits, targets.float(), 0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        rankops.compensated_cross_entropy(logits, torch.full((4,), -100), 0.1)
    assert float(rankops.compensated_cross_entropy(logits, torch.full((4,), -100), 0.1,
                                                   reduction="sum")) == 0.0
    bad = logits.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rankops.compensated_cross_entropy(bad, targets, 0.1)


# ---------------------------------------------------------------------------------------------
# torch.compile, and the transformers loss function
# ---------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager():
    logits, targets = make_case(32, 90, seed=23)

    def step(z, t):
        return rankops.compensated_cross_entropy(z, t, 0.4, backend="cpu", check_finite=False,
                                                 validate=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    compiled(x, targets).backward()
    step(y, targets).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)


def tiny_llama(vocab=97, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_transformers_loss_function_equals_causal_lm_loss_at_lam_zero():
    from rankops.integrations.transformers import CompensatedCausalLMLoss
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6] = -100
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grads = grads(model)
    model.zero_grad()
    model.loss_function = CompensatedCausalLMLoss(0.0)
    got = model(input_ids=ids, labels=labels).loss
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(grads(model), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_transformers_loss_function_is_the_compensated_loss_of_shifted_labels():
    from rankops.integrations.transformers import CompensatedCausalLMLoss
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    model.loss_function = CompensatedCausalLMLoss(0.5)
    out = model(input_ids=ids, labels=ids)
    shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    want = truth(out.logits.detach(), shifted, 0.5)[0]
    assert float(out.loss) == pytest.approx(want, rel=2e-6)


def test_trainer_compute_loss_func_with_gradient_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rankops.integrations.transformers import CompensatedCausalLMLoss

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(3))

    def trained_grads(loss, accumulation):
        model = tiny_llama(seed=4)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0, report_to=[],
            use_cpu=True, save_strategy="no", logging_strategy="no", max_grad_norm=0.0)
        captured = {}
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(ids),
                                       compute_loss_func=loss)

        class Grab(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                captured["grads"] = [p.grad.clone() for p in model.parameters()]

        trainer.add_callback(Grab())
        trainer.train()
        return captured["grads"]

    one = trained_grads(CompensatedCausalLMLoss(0.0), 1)
    two = trained_grads(CompensatedCausalLMLoss(0.0), 2)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with_lam = trained_grads(CompensatedCausalLMLoss(0.3), 1)
    assert any(not torch.allclose(a, b) for a, b in zip(one, with_lam))


def test_shifted_view_is_never_copied(backend, device):
    """Forward + backward on a [B, T-1, V] slice of [B, T, V] logits (the usual shifted view)
    allocates one tensor of the logits' size: the gradient. A reshape of the slice (which
    copies it) used to double the backward's peak memory. The torch reference may copy."""
    if backend == "torch":
        pytest.skip("the reference backend materialises temporaries by design")
    from torch.profiler import ProfilerActivity, profile
    B, T, V = 2, 9, 3000
    big = torch.randn(B, T, V, device=device)
    logits = big[:, :-1].detach().requires_grad_()  # a strided leaf: its grad is [B, T-1, V]
    targets = torch.randint(0, V, (B, T - 1), device=device)
    n_bytes = logits.numel() * logits.element_size()
    on_gpu = device.type == "cuda"  # then the allocations to count are the GPU's
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, profile_memory=True) as prof:
        loss = rankops.compensated_cross_entropy(logits, targets, 0.3, backend=backend)
        loss.backward()
    usage = "self_device_memory_usage" if on_gpu else "self_cpu_memory_usage"
    big_allocs = [e.name for e in prof.events() if getattr(e, usage) >= n_bytes]
    assert len(big_allocs) == 1, big_allocs
    assert logits.grad.shape == logits.shape
