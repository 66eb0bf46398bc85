"""python -m rankops: with no arguments, check this installation against the known-answer case
(per backend); with arguments, the rankops command line (rankops/cli.py)."""
import sys

import torch

import rankops
from rankops.testing import KNOWN_ANSWER, known_answer_case

COMPONENTS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")


def selfcheck() -> bool:
    logits, targets = known_answer_case()
    print(f"rankops {rankops.__version__}, torch {torch.__version__}, "
          f"backends: {', '.join(rankops.available_backends())}")
    # float64 logp of the float32 logits reproduces the float64 expectations to ~1e-12;
    # the kernels' float32 logp carry fp32 rounding (about 1e-7 relative per token).
    cases = [("torch", torch.float64, 1e-10)]
    cases += [(b, torch.float32, 1e-5) for b in rankops.available_backends()]
    ok = True
    for backend, dtype, tol in cases:
        acc = rankops.RankAccumulator(logits.shape[1])
        acc.update(logits.to(dtype), targets, backend=backend)
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


def main(argv=None) -> int:
    """With no arguments, the self-check; otherwise the rankops command line."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from rankops.cli import main as cli_main
        return cli_main(argv)
    return 0 if selfcheck() else 1


if __name__ == "__main__":
    sys.exit(main())
