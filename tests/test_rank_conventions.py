"""TokenStats.rank_as: the other rank conventions, exact on integers (docs/DESIGN.md, "Rank
conventions"), and the one place where a serving engine's count on log-probabilities departs."""
import numpy as np
import pytest
import torch

import rankops
from rankops.ops.token_stats import RANK_CONVENTIONS


def counts_from_definition(logits, targets, ignore_index=-100):
    """(#greater, #greater-or-equal including the target itself) per row, in float64 numpy."""
    z = logits.double().cpu().numpy()
    t = targets.cpu().numpy()
    keep = t != ignore_index
    z_t = z[np.arange(len(t)), np.where(keep, t, 0)]
    greater = (z > z_t[:, None]).sum(1)
    greater_equal = (z >= z_t[:, None]).sum(1)
    return keep, greater, greater_equal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_convention_from_its_definition(backend, device, dtype):
    g = torch.Generator().manual_seed(7)
    # Small integers: most rows have several logits equal to the target's.
    logits = torch.randint(-4, 5, (300, 97), generator=g).to(dtype)
    targets = torch.randint(0, 97, (300,), generator=g)
    targets[::11] = -100
    s = rankops.token_stats(logits.to(device), targets.to(device), backend=backend)
    keep, greater, greater_equal = counts_from_definition(logits, targets)
    assert (greater_equal - greater > 1).sum() > 100  # ties are common here, as intended
    want = {
        "paper": greater,                    # 0-based, strictly greater
        "pessimistic": greater_equal - 1,    # 0-based, greater or equal, the target not counted
        "one_based": greater + 1,
        "one_based_ge": greater_equal,       # the target counts itself
        "vllm": greater_equal,
        "vllm_v0": greater + 1,
    }
    assert set(want) == set(RANK_CONVENTIONS)
    for name, expected in want.items():
        got = s.rank_as(name).cpu().numpy()
        assert got.dtype == np.int64
        assert np.array_equal(got, np.where(keep, expected, -1)), name
    assert torch.equal(s.rank_as("paper"), s.rank)


def test_unknown_convention_is_refused():
    s = rankops.token_stats(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="convention"):
        s.rank_as("sglang")
    with pytest.raises(ValueError, match="convention"):
        s.rank_as(1)


def vllm_v1_rank(logits, targets):
    """What vLLM's V1 engine reports (vllm/v1/sample/ops/logprobs.py, batched_count_greater_than
    on the fp32 log_softmax): the count of log-probabilities >= the target's."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (logprobs >= logprobs.gather(-1, targets[:, None])).sum(-1)


def vllm_v0_rank(logits, targets):
    """What vLLM's V0 engine reported (_get_ranks in vllm/model_executor/layers/sampler.py):
    1 + the count of log-probabilities > the target's."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (logprobs > logprobs.gather(-1, targets[:, None])).sum(-1) + 1


def test_log_probabilities_can_merge_logits_that_differ():
    # Row 0: the target's logit 0 and a neighbour 2^-25 above it. logsumexp is about 2.15, whose
    # fp32 ulp is 2^-22, so z - lse rounds both to the same log-probability.
    row = torch.full((20,), -1.0)
    row[0], row[1] = 0.0, 2.0 ** -25
    logits = torch.stack([row, row.flip(0)])
    targets = torch.tensor([0, 18])      # row 1: the same target, the neighbour now below it
    s = rankops.token_stats(logits, targets)
    assert s.rank.tolist() == [1, 0] and s.ties.tolist() == [0, 0]
    logprobs = torch.log_softmax(logits, dim=-1)
    assert logprobs[0, 0] == logprobs[0, 1] and logits[0, 0] != logits[0, 1]  # the merge itself
    # On the logits the conventions are exact; on the log-probabilities the >= count takes the
    # smaller neighbour of row 1 in, and the > count misses the larger one of row 0.
    assert s.rank_as("vllm").tolist() == [2, 1]
    assert vllm_v1_rank(logits, targets).tolist() == [2, 2]
    assert s.rank_as("vllm_v0").tolist() == [2, 1]
    assert vllm_v0_rank(logits, targets).tolist() == [1, 1]


def test_engine_counts_bracket_the_exact_ones_on_real_scale_logits():
    # bf16 logits of a real scale: many exact ties, and fp32 log-probabilities that are monotone
    # in the logits, so the engines' counts can only err outwards: >= never below rank + ties + 1,
    # > never above rank. Counted on the logits themselves (vLLM's newer GPU model runner counts
    # logits >= the target's), the >= count is rank + ties + 1 exactly.
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 50304, generator=g) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 50304, (64,), generator=g)
    s = rankops.token_stats(logits, targets)
    assert int(s.ties.sum()) > 0
    on_logits = (logits >= logits.gather(-1, targets[:, None])).sum(-1)
    assert torch.equal(on_logits, s.rank_as("vllm"))
    assert (vllm_v1_rank(logits, targets) >= s.rank_as("vllm")).all()
    assert (vllm_v0_rank(logits, targets) <= s.rank_as("vllm_v0")).all()
