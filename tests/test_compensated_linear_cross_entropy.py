"""compensated_linear_cross_entropy: the compensated loss from hidden states, and its
transformers adapter CompensatedCausalLMLinearLoss.

The truth is autograd through the materialised logits: F.linear(hidden, weight, bias) fed to
rankops.compensated_cross_entropy (itself tested against an independent float64 implementation
in tests/test_compensated_cross_entropy.py), in float64, where both paths must agree to
rounding. Finite differences (torch.autograd.gradcheck) check that the block-wise backward is
the derivative of the value; lam = 0 is checked against F.cross_entropy directly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import rankops
from rankops.integrations.transformers import CompensatedCausalLMLinearLoss, CompensatedCausalLMLoss
from rankops.loss import RunningRankStats
from rankops.ops import linear_softmax_grad as lsg
from rankops.ops import linear_token_stats as lts

HOST = [b for b in ("cpu", "torch") if b in rankops.available_backends()]


def make_case(lead, d, n_vocab, dtype=torch.float64, *, seed=0, ignore_frac=0.2, n_cols=None,
              bias=True, ignore_index=-100):
    """hidden [*lead, d], weight [n_vocab, d], bias [n_vocab] or None, targets [*lead] in
    [0, n_cols): 40% the top-1 of their row (so rank 0 is common, as in a trained model)."""
    g = torch.Generator().manual_seed(seed)
    n_cols = n_vocab if n_cols is None else n_cols
    hidden = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    weight = torch.randn(n_vocab, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d))
    b = torch.randn(n_vocab, generator=g, dtype=torch.float64) * 0.5 if bias else None
    logits = F.linear(hidden, weight, b)[..., :n_cols]
    targets = torch.randint(0, n_cols, lead, generator=g)
    targets = torch.where(torch.rand(lead, generator=g) < 0.4, logits.argmax(-1), targets)
    targets[torch.rand(lead, generator=g) < ignore_frac] = ignore_index
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(hidden), cast(weight), cast(b), targets


def leaves(*tensors):
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in tensors]


def grads_of(loss, tensors, upstream=None):
    """d(loss . upstream)/d tensors (upstream: per-token weights for reduction 'none')."""
    total = loss.sum() if upstream is None else (loss * upstream).sum()
    present = [x for x in tensors if x is not None]
    got = iter(torch.autograd.grad(total, present))
    return [None if x is None else next(got) for x in tensors]


def linear_path(hidden, weight, bias, targets, lam, upstream=None, **kw):
    h, w, b = leaves(hidden, weight, bias)
    loss = rankops.compensated_linear_cross_entropy(h, w, targets, lam, bias=b, **kw)
    return loss.detach(), grads_of(loss, [h, w, b], upstream)


def logits_path(hidden, weight, bias, targets, lam, upstream=None, vocab_size=None, **kw):
    """The truth: autograd through F.linear and compensated_cross_entropy (reference backend)."""
    kw.pop("block_size", None)
    kw.setdefault("backend", "torch")
    h, w, b = leaves(hidden, weight, bias)
    logits = F.linear(h, w, b)
    loss = rankops.compensated_cross_entropy(logits, targets, lam, vocab_size=vocab_size, **kw)
    return loss.detach(), grads_of(loss, [h, w, b], upstream)


def assert_f64_close(got, want):
    loss, grads = got
    want_loss, want_grads = want
    assert loss.dtype == torch.float64 and loss.shape == want_loss.shape
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-13)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, want_grads):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


# ---------------------------------------------------------------------------------------------
# float64: the same loss and gradients as autograd on the materialised logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lam", [0.0, 0.3, -0.2])
def test_matches_materialised_logits(lam, reduction):
    # 3-d hidden, a padded weight (41 rows, 37 that count), ignored tokens, and blocks of 8
    # vocabulary rows: five blocks, the last one short and ending at vocab_size.
    hidden, weight, bias, targets = make_case((3, 7), 6, 41, n_cols=37)
    upstream = None
    if reduction == "none":  # per-token upstream gradients, not all equal
        upstream = torch.rand(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = dict(reduction=reduction, vocab_size=37)
    got = linear_path(hidden, weight, bias, targets, lam, upstream, block_size=8, **kw)
    want = logits_path(hidden, weight, bias, targets, lam, upstream, **kw)
    assert_f64_close(got, want)
    assert got[0].shape == (() if reduction != "none" else (3, 7))
    assert torch.all(got[1][1][37:] == 0) and torch.all(got[1][2][37:] == 0)  # padding
    ignored = targets == -100
    assert ignored.any() and torch.all(got[1][0][ignored] == 0)


@pytest.mark.parametrize("block_size", [None, 1, 5, 16, 100])
def test_block_sizes_without_bias(block_size):
    hidden, weight, _, targets = make_case((20,), 5, 16, bias=False, seed=1)
    got = linear_path(hidden, weight, None, targets, 0.4, block_size=block_size)
    assert_f64_close(got, logits_path(hidden, weight, None, targets, 0.4))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(as_tensor):
    hidden, weight, bias, targets = make_case((2, 9), 4, 23, seed=2)
    n_items = torch.tensor(40) if as_tensor else 40
    got = linear_path(hidden, weight, bias, targets, 0.3, num_items_in_batch=n_items, block_size=6)
    want = logits_path(hidden, weight, bias, targets, 0.3, num_items_in_batch=n_items)
    assert_f64_close(got, want)
    mean = linear_path(hidden, weight, bias, targets, 0.3)[0]
    assert float(got[0]) == pytest.approx(float(mean) * int((targets != -100).sum()) / 40, rel=1e-12)


@pytest.mark.parametrize("ignore_index", [-1, 3])
def test_ignore_index(ignore_index):
    # ignore_index inside [0, V) drops the tokens whose target is that class (torch's rule).
    hidden, weight, bias, targets = make_case((30,), 4, 12, seed=3, ignore_index=ignore_index)
    targets[:3] = 3
    got = linear_path(hidden, weight, bias, targets, 0.5, ignore_index=ignore_index, block_size=5)
    want = logits_path(hidden, weight, bias, targets, 0.5, ignore_index=ignore_index)
    assert_f64_close(got, want)
    assert torch.all(got[1][0][targets == ignore_index] == 0)


def test_tied_weights():
    # The output layer's weight is also the embedding: autograd adds the two gradients.
    g = torch.Generator().manual_seed(4)
    V, D = 29, 6
    table = (torch.randn(V, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, V, (3, 11), generator=g)
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]

    def grads(use_linear):
        hidden = torch.tanh(F.embedding(ids, table) @ mix)          # [3, 11, D]
        if use_linear:
            loss = rankops.compensated_linear_cross_entropy(hidden, table, labels, 0.3, block_size=7)
        else:
            loss = rankops.compensated_cross_entropy(F.linear(hidden, table), labels, 0.3, backend="torch")
        return (loss.detach(),) + torch.autograd.grad(loss, (table, mix))

    got, want = grads(True), grads(False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_running_statistics_and_min_weight():
    hidden, weight, bias, targets = make_case((40,), 5, 19, seed=6)
    runs = []
    for path in (linear_path, logits_path):
        running = RunningRankStats(19, decay=0.9)
        out = []
        for step in range(3):
            h = hidden + 0.1 * step  # a different batch each step
            out.append(path(h, weight, bias, targets, 0.8, running=running, min_weight=0.0, block_size=4))
        runs.append((out, running))
    (got, got_running), (want, want_running) = runs
    for a, b in zip(got, want):
        assert_f64_close(a, b)
    torch.testing.assert_close(got_running.count, want_running.count, rtol=0, atol=0)
    torch.testing.assert_close(got_running.sum_logp, want_running.sum_logp, rtol=1e-13, atol=1e-13)


def test_only_requested_gradients():
    # A frozen lm_head (weight without requires_grad) gets no gradient and costs no G.T @ h.
    hidden, weight, bias, targets = make_case((10,), 4, 9, seed=7)
    h = hidden.clone().requires_grad_(True)
    loss = rankops.compensated_linear_cross_entropy(h, weight, targets, 0.2, bias=bias)
    loss.backward()
    want = logits_path(hidden, weight, bias, targets, 0.2)[1][0]
    torch.testing.assert_close(h.grad, want, rtol=1e-10, atol=1e-13)
    assert weight.grad is None and bias.grad is None


# ---------------------------------------------------------------------------------------------
# Finite differences and lam = 0
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("lam", [0.4, -0.7])
def test_gradcheck(reduction, lam):
    # Ranks are piecewise constant: they must not move under gradcheck's 1e-6 perturbations,
    # so the case is checked to keep every other logit at least 1e-2 from its row's target.
    hidden, weight, bias, targets = make_case((7,), 3, 6, seed=8, ignore_frac=0.15)
    z = F.linear(hidden, weight, bias)
    keep = targets != -100
    gap = (z[keep] - z[keep].gather(1, targets[keep][:, None])).abs()
    gap[torch.arange(int(keep.sum())), targets[keep]] = float("inf")
    assert float(gap.min()) > 1e-2

    def f(h, w, b):
        return rankops.compensated_linear_cross_entropy(h, w, targets, lam, bias=b,
                                                        reduction=reduction, block_size=4)

    assert torch.autograd.gradcheck(f, leaves(hidden, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "torch")] + [(torch.float32, b) for b in HOST])
def test_lam_zero_is_cross_entropy(dtype, backend):
    hidden, weight, bias, targets = make_case((4, 13), 8, 50, dtype, seed=9)
    got = linear_path(hidden, weight, bias, targets, 0.0, backend=backend)
    h, w, b = leaves(hidden, weight, bias)
    loss = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), targets.flatten())
    want = (loss.detach(), grads_of(loss, [h, w, b]))
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(got[0].to(dtype), want[0], **tol)
    for a, c in zip(got[1], want[1]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, c, **tol)


# ---------------------------------------------------------------------------------------------
# fp32 and bf16: gradients in the inputs' dtype, close to the float64 answer
# ---------------------------------------------------------------------------------------------

def separated_case(dtype, seed=10):
    """Inputs representable in dtype, with targets whose float64 logit is at least 0.25 from
    every other logit of its row, so that rounding the logits to bf16 moves no rank."""
    hidden, weight, bias, _ = make_case((64,), 16, 300, seed=seed)
    hidden, weight, bias = (x.to(dtype).double() for x in (hidden, weight, bias))
    z = F.linear(hidden, weight, bias)
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((64,), -100)
    for i in range(64):
        order = z[i].sort().values
        gaps = torch.minimum(torch.diff(order, prepend=order[:1] - 1e9), torch.diff(order, append=order[-1:] + 1e9))
        ok = torch.nonzero(gaps >= 0.25).flatten()
        cols = z[i].argsort()[ok]
        if len(cols):
            targets[i] = int(cols[torch.randint(0, len(cols), (1,), generator=g)])
    top = z.argmax(-1)
    top_ok = (z.sort(-1, descending=True).values[:, :2].diff(dim=-1).abs().squeeze(1) >= 0.25)
    targets = torch.where(top_ok & (torch.arange(64) % 3 == 0), top, targets)  # some rank 0
    assert int((targets != -100).sum()) > 48
    return hidden, weight, bias, targets


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_low_precision_gradients(backend, dtype, lam):
    """Gradients come back in the inputs' dtype, within a stated tolerance of the float64
    answer (fp32: 1e-5, bf16: 2e-2 of the largest element), and no worse than autograd through
    F.linear in the same dtype: within a quarter of its error plus 1e-6 (fp32) or 1e-3 (bf16) of
    the largest element. (Recovering lse from an unrounded z_t, for one, fails the bf16 bound.)"""
    hidden, weight, bias, targets = separated_case(dtype)
    truth = logits_path(hidden, weight, bias, targets, lam)
    low = [x.to(dtype) for x in (hidden, weight, bias)]
    got = linear_path(*low, targets, lam, backend=backend)
    same_dtype = logits_path(*low, targets, lam, backend=backend)
    ranks = rankops.linear_token_stats(low[0], low[1], targets, bias=low[2], backend=backend).rank
    assert torch.equal(ranks, rankops.linear_token_stats(hidden, weight, targets, bias=bias,
                                                         backend="torch").rank)
    assert got[0].dtype == torch.float32
    assert float(got[0]) == pytest.approx(float(truth[0]), rel=1e-5 if dtype == torch.float32 else 2e-2)
    bound, slack = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 1e-3)
    for name, a, ref, t in zip(("hidden", "weight", "bias"), got[1], same_dtype[1], truth[1]):
        assert a.dtype == dtype and a.shape == t.shape, name
        scale = float(t.abs().max())
        err = float((a.double() - t).abs().max()) / scale
        ref_err = float((ref.double() - t).abs().max()) / scale
        assert err <= bound, (name, err)
        assert err <= 1.25 * ref_err + slack, (name, err, ref_err)


# ---------------------------------------------------------------------------------------------
# Memory: nothing of the logits' size
# ---------------------------------------------------------------------------------------------

def test_no_logits_sized_allocation(monkeypatch):
    """Forward and backward allocate nothing near N * V elements: the largest tensors are the
    forward's block buffer, the backward's [N, block] softmax and the [V, D] weight gradient."""
    if "cpu" not in HOST:
        pytest.skip("no cpu backend")
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setattr(lts, "BUFFER_ELEMENTS", 1 << 19)
    monkeypatch.setattr(lsg, "BLOCK_ELEMENTS", 1 << 19)
    n, d, v = 512, 8, 40000
    hidden, weight, bias, targets = make_case((n,), d, v, torch.float32, seed=11)
    h, w, b = leaves(hidden, weight, bias)
    logits_bytes = n * v * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = rankops.compensated_linear_cross_entropy(h, w, targets, 0.3, bias=b, backend="cpu")
        loss.backward()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    allowed = max(lts.BUFFER_ELEMENTS, lsg.BLOCK_ELEMENTS, v * d) * 4
    assert 0 < largest <= allowed <= logits_bytes / 19, (largest, allowed, logits_bytes)
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden="h"), TypeError, "hidden"),
    (dict(hidden=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "hidden"),
    (dict(weight=torch.zeros(10, 7)), ValueError, "weight"),
    (dict(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.zeros(9)), ValueError, "bias"),
    (dict(targets=torch.zeros(4)), TypeError, "targets"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), ValueError, "targets"),
    (dict(targets=torch.tensor([0, 1, 10, 2])), ValueError, "targets"),
    (dict(lam="0.1"), TypeError, "lam"),
    (dict(lam=float("inf")), ValueError, "lam"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction="none", num_items_in_batch=4), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(vocab_size=11), ValueError, "vocab_size"),
    (dict(running=RunningRankStats(9)), ValueError, "running"),
    (dict(min_weight="0"), TypeError, "min_weight"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=1000, backend="cpu"), ValueError, "block_size"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(targets=torch.full((4,), -100)), ValueError, "ignore_index"),
])
def test_bad_arguments_raise(kwargs, error, match):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8), targets=torch.tensor([0, 1, 2, 3]),
                lam=0.1)
    args.update(kwargs)
    pos = [args.pop(k) for k in ("hidden", "weight", "targets", "lam")]
    with pytest.raises(error, match=match):
        rankops.compensated_linear_cross_entropy(*pos, **args)


def test_nonfinite_raises_and_running_is_untouched():
    hidden, weight, bias, targets = make_case((6,), 4, 10, torch.float32, ignore_frac=0.0)
    weight[3, 0] = float("nan")
    running = RunningRankStats(10)
    with pytest.raises(ValueError, match="non-finite"):
        rankops.compensated_linear_cross_entropy(hidden, weight, targets, 0.1, running=running)
    assert running.n_updates == 0 and torch.all(running.count == 0)


# ---------------------------------------------------------------------------------------------
# The transformers adapter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_causal_lm_linear_loss_shifts_labels(lam):
    hidden, weight, bias, _ = make_case((2, 9), 5, 21, seed=12)
    labels = torch.randint(0, 21, (2, 9), generator=torch.Generator().manual_seed(13))
    labels[0, :3] = -100
    loss_fn = CompensatedCausalLMLinearLoss(lam, block_size=4)
    h, w, b = leaves(hidden, weight, bias)
    got = loss_fn(h, w, labels, bias=b, vocab_size=20, num_items_in_batch=15)
    got_grads = grads_of(got, [h, w, b])
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)   # by hand
    want = linear_path(hidden, weight, bias, shifted, lam, vocab_size=20, num_items_in_batch=15)
    assert_f64_close((got.detach(), got_grads), want)
    # shift_labels given: used as they are.
    again = loss_fn(hidden, weight, None, bias=bias, vocab_size=20, num_items_in_batch=15,
                    shift_labels=shifted)
    assert float(again) == float(got.detach())
    assert "lam=" in repr(loss_fn)


def test_causal_lm_linear_loss_running_and_bad_input():
    hidden, weight, _, _ = make_case((2, 6), 4, 11, seed=14)
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(15))
    loss_fn = CompensatedCausalLMLinearLoss(0.2, weights="running", decay=0.5)
    loss_fn(hidden, weight, labels)
    assert loss_fn.running.vocab_size == 11 and loss_fn.running.n_updates == 1
    with pytest.raises(ValueError, match="weights"):
        CompensatedCausalLMLinearLoss(0.2, weights="epoch")
    with pytest.raises(ValueError, match="labels"):
        loss_fn(hidden, weight, None)
    with pytest.raises(TypeError, match="lm_head_weight"):
        loss_fn(hidden, "weight", labels)


@pytest.mark.parametrize("tied", [False, True])
def test_with_a_transformers_model(tied):
    """The documented use: the base model's last hidden states and the output embedding's
    weight (lm_head.weight), no logits. The
    same loss and parameter gradients as CompensatedCausalLMLoss on the model's logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(16))
    labels = ids.clone()
    labels[1, :5] = -100

    model.zero_grad()
    hidden = model.base_model(input_ids=ids).last_hidden_state      # model.model, for Llama
    got = CompensatedCausalLMLinearLoss(0.3)(hidden, model.get_output_embeddings().weight, labels,
                                             vocab_size=config.vocab_size)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    want = CompensatedCausalLMLoss(0.3)(model(input_ids=ids).logits, labels)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    for name, p in model.named_parameters():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_token_ignored_with_sum_is_zero():
    # No kept row: the loss is 0 and every gradient is zero (the backward has no block to do).
    hidden, weight, bias, _ = make_case((5,), 4, 9, torch.float32)
    targets = torch.full((5,), -100)
    loss, grads = linear_path(hidden, weight, bias, targets, 0.3, reduction="sum")
    assert float(loss) == 0.0
    assert all(torch.all(g == 0) and g.dtype == torch.float32 for g in grads)
