"""RankAccumulator: the per-rank sufficient statistics of a corpus, mergeable by addition.

The sums of logp are kept in exact fixed point: each token's logp is quantised to
q = floor(logp * 2^40 + 1/2) (exact for float32 values of magnitude >= 2^-16, within 2^-41
otherwise) and summed as two int64 words per bin, hi = q >> 32 and lo = q mod 2^32, with lo's
carry moved into hi. Integer addition is associative, so batches, shards, threads and processes
merge bit-identically in any order; float64 appears only when the decomposition is computed.
"""
from typing import Optional

import torch

from rankops.decompose import TIE_MODES, Decomposition, decompose_counts
# The state's rows and fixed point (rows of [6, vocab_size]) are defined beside the accumulate op.
from rankops.ops.token_stats import (COUNT, COUNT_PESS, LOGP_LIMIT, LOGP_SCALE, SUM_HI, SUM_HI_PESS,
                                     SUM_LO, SUM_LO_PESS, accumulate_op, check_inputs,
                                     check_sync_options, nonfinite_error, resolve_backend,
                                     row_position, token_stats)

STATE_FORMAT = 1
LOW_MASK = (1 << 32) - 1


def quantize_logp(logp: torch.Tensor) -> torch.Tensor:
    """float logp -> int64 fixed point with 40 fractional bits (round half up)."""
    return torch.floor(logp.to(torch.float64) * LOGP_SCALE + 0.5).to(torch.int64)


def fixed_to_float(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The float64 value of hi * 2^32 + lo, in units of 2^-40."""
    return hi.to(torch.float64) * 2.0 ** -8 + lo.to(torch.float64) * 2.0 ** -40


def normalize_carry(stats: torch.Tensor) -> None:
    """Moves each lo word's carry into its hi word, leaving lo in [0, 2^32)."""
    for hi, lo in ((SUM_HI, SUM_LO), (SUM_HI_PESS, SUM_LO_PESS)):
        carry = stats[lo] >> 32
        stats[hi] += carry
        stats[lo] -= carry << 32


class RankAccumulator:
    """Per-rank token counts and logp sums, strict and tie-pessimistic.

    count[k] and sum_logp[k] for k in [0, vocab_size), by rank and by rank + ties. They add
    elementwise, so batches, shards and processes merge by summation, exactly. Logits wider
    than vocab_size (padded output layers) are truncated to vocab_size columns.

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
        self.stats = torch.zeros(6, vocab_size, dtype=torch.int64, device=device)  # rows: see COUNT...
        self.n_tied = torch.zeros((), dtype=torch.int64, device=device)  # tokens with >= 1 tie
        self.n_skipped = torch.zeros((), dtype=torch.int64, device=device)  # see update(validate=)
        self.ties_known = True  # False once update_stats() was given no ties

    # Read-only views of the state.
    @property
    def device(self) -> torch.device:
        return self.stats.device

    @property
    def count(self) -> torch.Tensor:
        """[vocab_size] int64: tokens of each strict rank."""
        return self.stats[COUNT]

    @property
    def sum_logp(self) -> torch.Tensor:
        """[vocab_size] float64: the sum of logp over the tokens of each strict rank."""
        return fixed_to_float(self.stats[SUM_HI], self.stats[SUM_LO])

    @property
    def count_pessimistic(self) -> torch.Tensor:
        return self.stats[COUNT_PESS]

    @property
    def sum_logp_pessimistic(self) -> torch.Tensor:
        return fixed_to_float(self.stats[SUM_HI_PESS], self.stats[SUM_LO_PESS])

    @property
    def n_tokens(self) -> int:
        return int(self.stats[COUNT].sum())

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
        self.stats = self.stats.to(device)
        self.n_tied = self.n_tied.to(device)
        self.n_skipped = self.n_skipped.to(device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
               backend: str = "auto", check_finite: bool = True, validate: bool = True) -> None:
        """Adds a batch: logits [..., V] with V >= vocab_size, targets of the leading shape.

        check_finite=False admits non-finite logits (say -inf for masked tokens) as long as
        every kept token's logp is finite. A call that raises adds nothing. validate=False
        (with check_finite=False) skips every check that needs a device sync; a token whose
        logp cannot be accumulated is then left out and counted in n_skipped, which
        decompose() reports."""
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns but the accumulator counts "
                             f"vocab_size={self.vocab_size} ranks")
        check_sync_options(check_finite, validate)
        check_inputs(logits, targets, ignore_index, self.vocab_size, validate)
        self._adopt_device(logits.device, "logits")
        backend = resolve_backend(backend, logits)
        if backend == "torch" and not validate:
            self._update_leaving_out(logits, targets, ignore_index, backend)
            return
        if backend == "torch":
            stats = token_stats(logits, targets, ignore_index=ignore_index,
                                vocab_size=self.vocab_size, backend=backend,
                                check_finite=check_finite)
            self.update_stats(stats.rank, stats.logp, ties=stats.ties)
            return
        targets64 = targets.to(torch.int64).contiguous()
        # The GPU kernels add as they go; when validating they add to a scratch copy that is
        # merged only once the checks pass. The CPU kernel adds only on success by itself.
        scratch = backend != "cpu" and validate
        target_stats = torch.zeros_like(self.stats) if scratch else self.stats
        info = accumulate_op(logits, targets64, ignore_index, self.vocab_size, backend,
                             target_stats, check_finite)
        if backend == "cpu" and not validate and int(info[1]) >= 0:
            # The CPU kernel adds nothing when a kept token's logp cannot be accumulated; as on
            # the GPU, leave out only those tokens (checking costs no sync on the host).
            self._update_leaving_out(logits, targets64, ignore_index, backend)
            return
        if validate:
            nonfinite_row, bad_logp_row = int(info[0]), int(info[1])  # the one sync
            if check_finite and nonfinite_row >= 0:
                raise nonfinite_error(nonfinite_row, targets.shape)
            if bad_logp_row >= 0:
                raise _bad_logp_error(bad_logp_row, targets.shape)
        if scratch:
            self.stats += target_stats
        self.n_tied += info[2].to(self.device)
        self.n_skipped += info[3].to(self.device)
        normalize_carry(self.stats)

    def _update_leaving_out(self, logits, targets, ignore_index, backend) -> None:
        """update(validate=False) on the host: adds every kept token whose logp can be
        accumulated, and counts the others in n_skipped."""
        s = token_stats(logits, targets, ignore_index=ignore_index, vocab_size=self.vocab_size,
                        backend=backend, check_finite=False)
        kept = s.rank >= 0
        ok = kept & (s.logp.abs() < LOGP_LIMIT)
        self.update_stats(torch.where(ok, s.rank, -1), torch.where(ok, s.logp, 0.0),
                          ties=torch.where(ok, s.ties, 0))
        self.n_skipped += (kept & ~ok).sum()

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
        if ties is not None and (ties.is_floating_point() or ties.dtype == torch.bool):
            raise TypeError(f"ties must be an integer tensor, got dtype {ties.dtype}")
        self._adopt_device(rank.device, "rank")
        rank = rank.reshape(-1).to(self.device, torch.int64)
        logp = logp.reshape(-1).to(self.device)
        n = self.vocab_size
        if bool((rank < -1).any()) or bool((rank >= n).any()):
            raise ValueError(f"rank must lie in [0, {n}) or be -1 (ignored)")
        keep = rank >= 0
        r, lp = rank[keep], logp[keep].to(torch.float64)
        bad = ~(lp.abs() < LOGP_LIMIT)  # also NaN
        if bool(bad.any()):
            raise _bad_logp_error(int(torch.nonzero(keep)[torch.nonzero(bad)[0, 0], 0]), rank.shape)
        if ties is not None:
            t = ties.reshape(-1).to(self.device, torch.int64)[keep]
            if bool((t < 0).any()) or bool((r + t >= n).any()):
                raise ValueError(f"ties must be >= 0 with rank + ties < vocab_size={n}")
        q = quantize_logp(lp)
        hi, lo = q >> 32, q & LOW_MASK
        ones = torch.ones_like(r)
        # All checks are done: from here on the state changes.
        self.stats[COUNT].index_add_(0, r, ones)
        self.stats[SUM_HI].index_add_(0, r, hi)
        self.stats[SUM_LO].index_add_(0, r, lo)
        if ties is None:
            self.ties_known = False
        else:
            self.stats[COUNT_PESS].index_add_(0, r + t, ones)
            self.stats[SUM_HI_PESS].index_add_(0, r + t, hi)
            self.stats[SUM_LO_PESS].index_add_(0, r + t, lo)
            self.n_tied += (t > 0).sum()
        normalize_carry(self.stats)

    def merge(self, other: "RankAccumulator") -> "RankAccumulator":
        """Adds other's statistics into this accumulator (in place) and returns it."""
        if not isinstance(other, RankAccumulator):
            raise TypeError(f"other must be a RankAccumulator, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge accumulators of vocab_size {self.vocab_size} and "
                             f"{other.vocab_size}")
        self.stats += other.stats.to(self.device)
        self.n_tied += other.n_tied.to(self.device)
        self.n_skipped += other.n_skipped.to(self.device)
        normalize_carry(self.stats)
        self.ties_known = self.ties_known and other.ties_known
        return self

    def all_reduce(self, group=None) -> "RankAccumulator":
        """Sums the state over the processes of a torch.distributed group, in place; returns self.

        One int64 all-reduce (SUM) of the state (never an all-gather), so every process ends with
        the accumulator of all tokens, bit for bit. gloo takes CPU state, nccl CUDA state (CPU
        state is moved to the current GPU for the collective). Call it once: a second call
        would add the totals again. See rankops.distributed."""
        from rankops.distributed import all_reduce_accumulator
        return all_reduce_accumulator(self, group)

    def update_vocab_parallel(self, local_logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                              vocab_size: Optional[int] = None, group=None, ignore_index: int = -100,
                              check_finite: bool = True) -> None:
        """Adds a batch whose vocabulary is split over the group's processes (each holds columns
        [vocab_start, vocab_start + V_local)); see rankops.token_stats_vocab_parallel. Every
        process of the group adds the same tokens, so its accumulators stay equal; all_reduce
        over the data-parallel group only. vocab_size defaults to the accumulator's."""
        from rankops.distributed import token_stats_vocab_parallel
        if vocab_size is not None and vocab_size > self.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} exceeds the accumulator's vocab_size={self.vocab_size}")
        stats = token_stats_vocab_parallel(local_logits, targets, vocab_start=vocab_start,
                                           vocab_size=self.vocab_size if vocab_size is None else vocab_size,
                                           group=group, ignore_index=ignore_index, check_finite=check_finite)
        self.update_stats(stats.rank, stats.logp, ties=stats.ties)

    def copy(self) -> "RankAccumulator":
        new = RankAccumulator(self.vocab_size, device=self.device)
        new._device_fixed = self._device_fixed
        return new.merge(self)

    def __add__(self, other: "RankAccumulator") -> "RankAccumulator":
        return self.copy().merge(other)

    def __iadd__(self, other: "RankAccumulator") -> "RankAccumulator":
        return self.merge(other)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "vocab_size": self.vocab_size, "stats": self.stats.clone(),
                "n_tied": self.n_tied.clone(), "n_skipped": self.n_skipped.clone(),
                "ties_known": self.ties_known}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("format", "vocab_size", "stats", "n_tied") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state has format {state['format']}, this version reads {STATE_FORMAT}")
        if state["vocab_size"] != self.vocab_size:
            raise ValueError(f"state has vocab_size {state['vocab_size']}, the accumulator "
                             f"{self.vocab_size}")
        stats = state["stats"]
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 \
                or tuple(stats.shape) != (6, self.vocab_size):
            raise ValueError(f"state['stats'] must be an int64 tensor of shape (6, {self.vocab_size})")
        self.stats = stats.to(self.device).clone()
        self.n_tied = torch.as_tensor(state["n_tied"], dtype=torch.int64).to(self.device).clone()
        self.n_skipped = torch.as_tensor(state.get("n_skipped", 0), dtype=torch.int64).to(self.device).clone()
        self.ties_known = bool(state.get("ties_known", True))

    def decompose(self, ties: str = "strict") -> Decomposition:
        """The decomposition of everything added so far; ties="pessimistic" uses rank + ties."""
        if ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
        n_skipped = int(self.n_skipped)
        if n_skipped:
            raise ValueError(f"{n_skipped} token(s) were left out by update(validate=False) because "
                             "their logp was non-finite; the decomposition would not cover them")
        if ties == "pessimistic":
            if not self.ties_known:
                raise ValueError("the tie-pessimistic decomposition needs tie counts, but "
                                 "update_stats() was called without ties")
            return decompose_counts(self.count_pessimistic, self.sum_logp_pessimistic, ties=ties)
        return decompose_counts(self.count, self.sum_logp, ties=ties)

    def __repr__(self) -> str:
        return (f"RankAccumulator(vocab_size={self.vocab_size}, n_tokens={self.n_tokens}, "
                f"device={self.device})")


def _bad_logp_error(row: int, shape) -> ValueError:
    pos = row_position(row, shape)
    return ValueError(f"logp of the token at position {pos} is non-finite or beyond -2^23 and "
                      f"cannot be accumulated (non-finite logits with check_finite=False?)")
