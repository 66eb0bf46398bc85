"""Known-answer inputs for checking an installation, a backend or a new kernel.

known_answer_case() builds docs/DESIGN.md's known-answer case; KNOWN_ANSWER holds its expected
values, computed independently in float64 from the definitions; selfcheck() checks every
available backend against them (`rankops selfcheck`, `python -m rankops`).
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


COMPONENTS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")


def selfcheck() -> bool:
    """Checks this installation against the known-answer case on every available backend
    (`rankops selfcheck`, `python -m rankops`); prints each decomposition, returns True if all pass."""
    import rankops
    logits, targets = known_answer_case()
    print(f"rankops {rankops.__version__}, torch {torch.__version__}, "
          f"backends: {', '.join(rankops.available_backends())}")
    # float64 logp of the float32 logits reproduces the float64 expectations to ~1e-12;
    # the kernels' float32 logp carry fp32 rounding (about 1e-7 relative per token).
    cases = [("torch", torch.float64, 1e-10)]
    cases += [(b, torch.float32, 1e-5) for b in rankops.available_backends()]
    ok = True
    for backend, dtype, tol in cases:
        # The GPU backends take CUDA tensors (Triton runs on CPU tensors only interpreted).
        device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
        acc = rankops.RankAccumulator(logits.shape[1], device=device)
        acc.update(logits.to(device=device, dtype=dtype), targets.to(device), backend=backend)
        d = acc.decompose()
        n_sum = int((torch.as_tensor(d.ranks) * torch.as_tensor(d.counts)).sum())
        errors = {k: abs(getattr(d, k) - KNOWN_ANSWER[k]) for k in COMPONENTS}
        passed = (len(d.ranks) == KNOWN_ANSWER["n_distinct_ranks"]
                  and n_sum == KNOWN_ANSWER["sum_of_ranks"] and max(errors.values()) <= tol)
        ok &= passed
        print(f"\n[{'ok' if passed else 'FAIL'}] backend={backend} logits={str(dtype)[6:]} "
              f"max |error| {max(errors.values()):.1e} (allowed {tol:.0e})")
        print(d)
    return ok
