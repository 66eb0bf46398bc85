"""The exact decomposition CE = EE + SA - Conf (Zhan et al., arXiv 2510.04067; docs/DESIGN.md, "Definitions").

Over the N kept tokens, with n_k tokens of rank k and L_k the sum of their logp:
    P(k) = n_k / N,   S(k) = exp(L_k / n_k),   Z = sum_k S(k),   Q(k) = S(k) / Z
    EE = H(P),   SA = KL(P || Q),   Conf = log Z,   CE = -(1/N) sum_i logp_i = EE + SA - Conf
Everything is computed in float64 from the per-rank sums, log Z by logsumexp, with no epsilon.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

TIE_MODES = ("strict", "pessimistic")


def _fsum(x: np.ndarray) -> float:
    return math.fsum(x.tolist())


@dataclass(frozen=True, repr=False)
class Decomposition:
    """CE = error_entropy + self_alignment - confidence, over n_tokens tokens.

    ranks, counts, P and Q are float64/int64 arrays over the observed ranks (ascending).
    ties says which rank was used: "strict" (rank) or "pessimistic" (rank + ties).
    """
    cross_entropy: float
    error_entropy: float
    self_alignment: float
    confidence: float
    n_tokens: int
    ranks: np.ndarray
    counts: np.ndarray
    P: np.ndarray
    Q: np.ndarray
    ties: str = "strict"

    @property
    def error_entropy_share(self) -> float:
        """The paper's share of Error-Entropy in cross-entropy, EE / CE (NaN when CE = 0: a
        model right on every token with probability 1 has no cross-entropy to share)."""
        return self.error_entropy / self.cross_entropy if self.cross_entropy != 0 else float("nan")

    @property
    def magnitude_shares(self) -> dict:
        """|X| / (|EE| + |SA| + |Conf|) for each component; these sum to 1."""
        parts = {"error_entropy": abs(self.error_entropy), "self_alignment": abs(self.self_alignment),
                 "confidence": abs(self.confidence)}
        total = sum(parts.values())
        return {k: (v / total if total > 0 else float("nan")) for k, v in parts.items()}

    @property
    def error_entropy_magnitude_share(self) -> float:
        """|EE| / (|EE| + |SA| + |Conf|)."""
        return self.magnitude_shares["error_entropy"]

    @property
    def top1_accuracy(self) -> float:
        """P(0): the fraction of tokens whose target is the (strictly) top-scored token."""
        return float(self.counts[0] / self.n_tokens) if self.ranks[0] == 0 else 0.0

    @property
    def mean_reciprocal_rank(self) -> float:
        """Mean of 1 / (rank + 1) over tokens (rank 0-based)."""
        return _fsum(self.counts / (self.ranks + 1.0)) / self.n_tokens

    @property
    def identity_residual(self) -> float:
        """CE - (EE + SA - Conf): zero up to float64 rounding."""
        return self.cross_entropy - (self.error_entropy + self.self_alignment - self.confidence)

    def as_dict(self, arrays: bool = False) -> dict:
        """Scalars (and, with arrays=True, the per-rank arrays as lists), JSON-ready: a share
        that is undefined (NaN, when CE or every component is 0) is None."""
        def share(x):
            return None if math.isnan(x) else x

        d = {
            "ties": self.ties,
            "n_tokens": self.n_tokens,
            "n_distinct_ranks": int(self.ranks.size),
            "cross_entropy": self.cross_entropy,
            "error_entropy": self.error_entropy,
            "self_alignment": self.self_alignment,
            "confidence": self.confidence,
            "error_entropy_share": share(self.error_entropy_share),
            "magnitude_shares": {k: share(v) for k, v in self.magnitude_shares.items()},
            "top1_accuracy": self.top1_accuracy,
            "mean_reciprocal_rank": self.mean_reciprocal_rank,
        }
        if arrays:
            d.update(ranks=self.ranks.tolist(), counts=self.counts.tolist(), P=self.P.tolist(),
                     Q=self.Q.tolist())
        return d

    def __repr__(self) -> str:
        return (
            f"Decomposition(ties={self.ties!r}, n_tokens={self.n_tokens}, "
            f"distinct_ranks={self.ranks.size})\n"
            f"  cross_entropy   {self.cross_entropy: .6f}  = EE + SA - Conf\n"
            f"  error_entropy   {self.error_entropy: .6f}  (EE/CE {self.error_entropy_share:.1%}, "
            f"|EE| share {self.error_entropy_magnitude_share:.1%})\n"
            f"  self_alignment  {self.self_alignment: .6f}\n"
            f"  confidence      {self.confidence: .6f}\n"
            f"  top1_accuracy {self.top1_accuracy:.4f}  "
            f"mean_reciprocal_rank {self.mean_reciprocal_rank:.4f}"
        )


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.device.type == "meta":
            raise TypeError(f"{name} must be a dense tensor with data, got layout {x.layout} on {x.device}")
        if x.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16; upcasting is exact
            x = x.to(torch.float64)
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def decompose_counts(count, sum_logp, *, ties: str = "strict") -> Decomposition:
    """The decomposition from per-rank sufficient statistics.

    Args:
        count: [V] integer, number of tokens of each rank.
        sum_logp: [V] float, sum of their logp.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    count = _as_numpy(count, "count")
    sum_logp = _as_numpy(sum_logp, "sum_logp")
    if count.ndim != 1 or sum_logp.shape != count.shape:
        raise ValueError(f"count and sum_logp must be 1-D arrays of one length, got shapes "
                         f"{count.shape} and {sum_logp.shape}")
    if not np.issubdtype(count.dtype, np.integer):
        raise TypeError(f"count must hold integers, got dtype {count.dtype}")
    if (count < 0).any():
        raise ValueError("count must be non-negative")
    ranks = np.flatnonzero(count)
    if ranks.size == 0:
        raise ValueError("nothing to decompose: n_tokens = 0 (every token was ignored, or none "
                         "was added)")
    if (sum_logp[count == 0] != 0).any():
        raise ValueError("sum_logp is nonzero for a rank with count 0")
    return _decompose_observed(ranks.astype(np.int64), count[ranks], sum_logp[ranks], ties)


def _decompose_observed(ranks: np.ndarray, n_k: np.ndarray, L_k: np.ndarray, ties: str) -> Decomposition:
    """The decomposition from the observed ranks only (ascending), their counts and logp sums."""
    if sum(int(n) for n in n_k) >= 2 ** 63:
        raise ValueError("count: the counts total 2^63 tokens or more (int64 overflow)")
    n_k = n_k.astype(np.int64)
    L_k = L_k.astype(np.float64)
    if not np.isfinite(L_k).all():
        raise ValueError("sum_logp holds non-finite values for observed ranks")
    if (L_k > 0).any():
        raise ValueError("sum_logp holds a positive sum: log-probabilities are <= 0")
    n_tokens = int(n_k.sum())
    n_float = n_k.astype(np.float64)
    P = n_float / n_tokens
    # log P to full relative precision: log1p of the (exact) complement where P > 1/2.
    log_P = np.where(2 * n_k > n_tokens, np.log1p(-(n_tokens - n_k) / n_tokens), np.log(P))
    log_S = L_k / n_float                              # log of the geometric-mean probability
    m = float(log_S.max())
    log_Z = m + math.log(_fsum(np.exp(log_S - m)))     # logsumexp
    log_Q = log_S - log_Z
    return Decomposition(
        cross_entropy=(0.0 - _fsum(L_k)) / n_tokens,  # 0.0 - x: +0.0, not -0.0, for a perfect model
        error_entropy=0.0 - _fsum(P * log_P),
        self_alignment=_fsum(P * (log_P - log_Q)),
        confidence=log_Z,
        n_tokens=n_tokens,
        ranks=ranks,
        counts=n_k,
        P=P,
        Q=np.exp(log_Q),
        ties=ties,
    )


def _observed_histograms(rank, logp):
    """The observed ranks (ascending), their counts and logp sums, in memory O(tokens) whatever
    the largest rank (a bincount would allocate up to it)."""
    rank = _as_numpy(rank, "rank")
    logp = _as_numpy(logp, "logp")
    if rank.shape != logp.shape:
        raise ValueError(f"rank and logp must have one shape, got {rank.shape} and {logp.shape}")
    if not np.issubdtype(rank.dtype, np.integer):
        raise TypeError(f"rank must hold integers, got dtype {rank.dtype}")
    if not np.issubdtype(logp.dtype, np.floating):
        raise TypeError(f"logp must hold floats, got dtype {logp.dtype}")
    rank, logp = rank.reshape(-1), logp.reshape(-1)
    if (rank < -1).any():
        raise ValueError("rank must be >= 0, or -1 for ignored tokens")
    keep = rank >= 0
    r, lp = rank[keep].astype(np.int64), logp[keep].astype(np.float64)
    if not np.isfinite(lp).all():
        raise ValueError("logp holds non-finite values for kept tokens")
    if (lp > 0).any():
        raise ValueError("logp holds positive values: log-probabilities are <= 0")
    ranks, inverse = np.unique(r, return_inverse=True)
    return ranks, np.bincount(inverse, minlength=ranks.size), np.bincount(inverse, weights=lp,
                                                                          minlength=ranks.size)


def decompose(rank, logp, *, ties: str = "strict") -> Decomposition:
    """The decomposition from per-token ranks and log-probabilities (torch or numpy).

    Tokens with rank -1 (ignored) are dropped. For the tie-pessimistic decomposition pass
    rank + ties and ties="pessimistic".

    Example:
        >>> d = rankops.decompose(torch.tensor([0, 0, 1, 3]), torch.tensor([-0.1, -0.2, -1.5, -3.0]))
        >>> round(d.error_entropy + d.self_alignment - d.confidence - d.cross_entropy, 12)
        0.0
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    ranks, n_k, L_k = _observed_histograms(rank, logp)
    if ranks.size == 0:
        raise ValueError("nothing to decompose: n_tokens = 0 (every token was ignored, or none "
                         "was added)")
    return _decompose_observed(ranks, n_k, L_k, ties)
