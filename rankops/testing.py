"""Known-answer inputs for checking an installation, a backend or a new kernel.

known_answer_case() builds docs/DESIGN.md's known-answer case; KNOWN_ANSWER holds its expected
values, computed independently in float64 from the definitions.
"""
import torch

KNOWN_ANSWER = {
    "n_distinct_ranks": 244,
    "sum_of_ranks": 130316,
    "cross_entropy": 7.082532203024,
    "error_entropy": 3.907218078939,
    "self_alignment": 1.950343193894,
    "confidence": -1.224970930191,
}


def known_answer_case(dtype: torch.dtype = torch.float32):
    """logits [512, 1000] and targets [512] of docs/DESIGN.md's known-answer case.

    z[t, v] = 4 cos(0.37 (t+1)(v+1)) + 2 sin(0.011 v ((t mod 7) + 1)) - 0.002 v, in float64,
    then cast to float32 (and then to dtype). Targets: (37 t + 11) mod V, then the row's argmax
    where t mod 3 = 0, then its second-largest entry where t mod 5 = 1 (the later rule wins).
    """
    n_rows, n_vocab = 512, 1000
    t = torch.arange(n_rows, dtype=torch.float64)[:, None]
    v = torch.arange(n_vocab, dtype=torch.float64)[None, :]
    z = (4 * torch.cos(0.37 * (t + 1) * (v + 1)) + 2 * torch.sin(0.011 * v * (t % 7 + 1))
         - 0.002 * v).to(torch.float32)
    rows = torch.arange(n_rows)
    targets = (37 * rows + 11) % n_vocab
    order = torch.sort(z, dim=1, descending=True, stable=True).indices
    targets = torch.where(rows % 3 == 0, order[:, 0], targets)
    targets = torch.where(rows % 5 == 1, order[:, 1], targets)
    return z.to(dtype), targets
