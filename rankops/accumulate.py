"""RankAccumulator: the per-rank sufficient statistics of a corpus, mergeable by addition."""
from typing import Optional

import torch

from rankops import _ext
from rankops.decompose import TIE_MODES, Decomposition, decompose_counts
from rankops.ops.token_stats import check_inputs, kernel_view, nonfinite_error, resolve_backend, token_stats

STATE_FORMAT = 1
_ARRAYS = ("count", "sum_logp", "count_pessimistic", "sum_logp_pessimistic")


class RankAccumulator:
    """Per-rank token counts and logp sums, strict and tie-pessimistic.

    count[k] (int64) and sum_logp[k] (float64) over k in [0, vocab_size), for rank and for
    rank + ties. They add elementwise, so batches, shards and processes merge by summation.
    Logits wider than vocab_size (padded output layers) are truncated to vocab_size columns.

    Example:
        >>> acc = rankops.RankAccumulator(vocab_size=50257)
        >>> for logits, targets in batches:
        ...     acc.update(logits, targets)
        >>> acc.decompose()
    """

    def __init__(self, vocab_size: int, *, device: Optional[torch.device] = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self._device_fixed = device is not None
        device = torch.device("cpu" if device is None else device)
        self.count = torch.zeros(vocab_size, dtype=torch.int64, device=device)
        self.sum_logp = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.count_pessimistic = torch.zeros_like(self.count)
        self.sum_logp_pessimistic = torch.zeros_like(self.sum_logp)
        self.n_tied = torch.zeros((), dtype=torch.int64, device=device)  # tokens with >= 1 tie
        self.ties_known = True  # False once update_stats() was given no ties

    @property
    def device(self) -> torch.device:
        return self.count.device

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    @property
    def tie_rate(self) -> float:
        """Fraction of tokens whose target logit equals at least one other logit."""
        if not self.ties_known:
            raise ValueError("tie counts are unknown: update_stats() was called without ties")
        return int(self.n_tied) / max(self.n_tokens, 1)

    def _adopt_device(self, device: torch.device, arg: str):
        if device == self.device:
            return
        if self._device_fixed or self.n_tokens > 0:
            raise ValueError(f"{arg} is on {device} but the accumulator's arrays are on "
                             f"{self.device}")
        for name in _ARRAYS + ("n_tied",):
            setattr(self, name, getattr(self, name).to(device))

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
               backend: str = "auto", check_finite: bool = True) -> None:
        """Adds a batch of logits [..., V] (V >= vocab_size) and targets of the leading shape."""
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns but the accumulator counts "
                             f"vocab_size={self.vocab_size} ranks")
        check_inputs(logits, targets, ignore_index, self.vocab_size)
        self._adopt_device(logits.device, "logits")
        if resolve_backend(backend, logits) == "cpu":
            view = kernel_view(logits)
            targets64 = targets.to(torch.int64).contiguous().view(view.shape[:-1])
            bad_row, _, n_tied = _ext.cpu_accumulate(
                view, targets64, ignore_index, self.vocab_size, self.count, self.sum_logp,
                self.count_pessimistic, self.sum_logp_pessimistic)
            if check_finite and bad_row >= 0:
                raise nonfinite_error(bad_row, targets.shape)
            self.n_tied += n_tied
            return
        stats = token_stats(logits, targets, ignore_index=ignore_index, vocab_size=self.vocab_size,
                            backend=backend, check_finite=check_finite)
        self.update_stats(stats.rank, stats.logp, ties=stats.ties)

    def update_stats(self, rank: torch.Tensor, logp: torch.Tensor,
                     ties: Optional[torch.Tensor] = None) -> None:
        """Adds per-token results (rank -1 = ignored), e.g. from rankops.token_stats.

        Without ties the tie-pessimistic statistics become unavailable."""
        for name, x in (("rank", rank), ("logp", logp), ("ties", ties)):
            if x is not None and not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if rank.shape != logp.shape or (ties is not None and ties.shape != rank.shape):
            raise ValueError(f"rank, logp (and ties) must share one shape, got {tuple(rank.shape)}, "
                             f"{tuple(logp.shape)}" + ("" if ties is None else f", {tuple(ties.shape)}"))
        if rank.is_floating_point() or rank.dtype == torch.bool:
            raise TypeError(f"rank must be an integer tensor, got dtype {rank.dtype}")
        if not logp.is_floating_point():
            raise TypeError(f"logp must be a floating-point tensor, got dtype {logp.dtype}")
        self._adopt_device(rank.device, "rank")
        rank, logp = rank.reshape(-1).to(self.device), logp.reshape(-1).to(self.device)
        keep = rank >= 0
        if bool((rank < -1).any()) or bool((rank >= self.vocab_size).any()):
            raise ValueError(f"rank must lie in [0, {self.vocab_size}) or be -1 (ignored)")
        r, lp = rank[keep], logp[keep].to(torch.float64)
        if not bool(torch.isfinite(lp).all()):
            raise ValueError("logp holds non-finite values for kept tokens")
        n = self.vocab_size
        self.count += torch.bincount(r, minlength=n)
        self.sum_logp += torch.bincount(r, weights=lp, minlength=n)
        if ties is None:
            self.ties_known = False
            return
        t = ties.reshape(-1).to(self.device)[keep].to(torch.int64)
        if bool((t < 0).any()) or bool((r + t >= n).any()):
            raise ValueError(f"ties must be >= 0 with rank + ties < vocab_size={n}")
        self.count_pessimistic += torch.bincount(r + t, minlength=n)
        self.sum_logp_pessimistic += torch.bincount(r + t, weights=lp, minlength=n)
        self.n_tied += (t > 0).sum()

    def merge(self, other: "RankAccumulator") -> "RankAccumulator":
        """Adds other's statistics into this accumulator (in place) and returns it."""
        if not isinstance(other, RankAccumulator):
            raise TypeError(f"other must be a RankAccumulator, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge accumulators of vocab_size {self.vocab_size} and "
                             f"{other.vocab_size}")
        for name in _ARRAYS + ("n_tied",):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.ties_known = self.ties_known and other.ties_known
        return self

    def copy(self) -> "RankAccumulator":
        new = RankAccumulator(self.vocab_size, device=self.device)
        new._device_fixed = self._device_fixed
        return new.merge(self)

    def __add__(self, other: "RankAccumulator") -> "RankAccumulator":
        return self.copy().merge(other)

    def __iadd__(self, other: "RankAccumulator") -> "RankAccumulator":
        return self.merge(other)

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).clone() for name in _ARRAYS + ("n_tied",)}
        state.update(vocab_size=self.vocab_size, ties_known=self.ties_known, format=STATE_FORMAT)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in _ARRAYS + ("n_tied", "vocab_size", "format") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state has format {state['format']}, this version reads {STATE_FORMAT}")
        if state["vocab_size"] != self.vocab_size:
            raise ValueError(f"state has vocab_size {state['vocab_size']}, the accumulator "
                             f"{self.vocab_size}")
        for name in _ARRAYS:
            x = state[name]
            want = torch.int64 if name.startswith("count") else torch.float64
            if not isinstance(x, torch.Tensor) or x.shape != (self.vocab_size,) or x.dtype != want:
                raise ValueError(f"state[{name!r}] must be a {want} tensor of shape "
                                 f"({self.vocab_size},)")
        for name in _ARRAYS + ("n_tied",):
            setattr(self, name, state[name].to(self.device).clone())
        self.ties_known = bool(state.get("ties_known", True))

    def decompose(self, ties: str = "strict") -> Decomposition:
        """The decomposition of everything added so far; ties="pessimistic" uses rank + ties."""
        if ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
        if ties == "pessimistic":
            if not self.ties_known:
                raise ValueError("the tie-pessimistic decomposition needs tie counts, but "
                                 "update_stats() was called without ties")
            return decompose_counts(self.count_pessimistic, self.sum_logp_pessimistic, ties=ties)
        return decompose_counts(self.count, self.sum_logp, ties=ties)

    def __repr__(self) -> str:
        return (f"RankAccumulator(vocab_size={self.vocab_size}, n_tokens={self.n_tokens}, "
                f"device={self.device})")
