"""RankAccumulator: the per-rank sufficient statistics of a corpus, mergeable by addition.

A thin holder of the state that rankops.ops.accumulate defines and writes (layout, exact fixed
point, failure semantics: docs/DESIGN.md, "The accumulator's state"). Nothing here reads or
writes the state's rows except through that module.
"""
import threading
from typing import Optional

import torch

from rankops.decompose import Decomposition
from rankops.ops import accumulate as state_ops
from rankops.ops.accumulate import (COUNT, COUNT_PESS, LOGP_LIMIT, SUM_HI, SUM_HI_PESS, SUM_LO,  # noqa: F401
                                    SUM_LO_PESS, fixed_to_float, normalize_carry, quantize_logp)

STATE_FORMAT = 1
# The state is 6 int64 rows of vocab_size bins (48 bytes a bin); ranks index int64 arrays, and
# the kernels take vocabulary indices as int64 but the largest real vocabularies are ~1e6.
MAX_VOCAB_SIZE = 2 ** 31 - 1


class RankAccumulator:
    """Per-rank token counts and logp sums, strict and tie-pessimistic.

    count[k] and sum_logp[k] for k in [0, vocab_size), by rank and by rank + ties. They add
    elementwise, so batches, shards and processes merge by summation, exactly. Logits wider
    than vocab_size (padded output layers) are truncated to vocab_size columns.

    Example:
        >>> import torch, rankops
        >>> acc = rankops.RankAccumulator(vocab_size=3)
        >>> acc.update(torch.tensor([[2.0, 1.0, 3.0], [0.0, 5.0, 1.0]]), torch.tensor([2, 1]))
        >>> acc.n_tokens, acc.count.tolist()
        (2, [2, 0, 0])
        >>> round(acc.decompose().cross_entropy, 6)
        0.216175
    """

    def __init__(self, vocab_size: int, *, device: Optional[torch.device] = None):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB_SIZE}], got {vocab_size}")
        device = _check_device(device)
        self.vocab_size = vocab_size
        self._device_fixed = device is not None
        # One update at a time: the kernels release the GIL, and two threads adding into the
        # same state would race on its words. The lock costs nothing next to a kernel call.
        self._lock = threading.RLock()
        # stats [6, vocab_size]: rows as in rankops.ops.accumulate; n_tied: tokens with >= 1 tie;
        # n_skipped: tokens left out by update(validate=False).
        try:
            self.stats, self.n_tied, self.n_skipped = state_ops.new_state(vocab_size, device)
        except RuntimeError as exc:  # out of memory on the device
            raise MemoryError(f"vocab_size={vocab_size}: the state needs {48 * vocab_size} bytes "
                              f"on {device or 'cpu'}, which could not be allocated ({exc})") from None
        self.ties_known = True  # False once update_stats() was given no ties

    def __getstate__(self):  # pickling (copy.deepcopy, torch.save of the object): no lock
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

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

    def _state_on(self, device: torch.device, arg: str):
        """The state to write a batch on `device` into: this one, or (for an empty accumulator
        whose device was not fixed) a fresh one there, adopted only once the batch succeeded."""
        if device == self.device:
            return self.stats, self.n_tied, self.n_skipped
        if self._device_fixed or self.n_tokens > 0:
            raise ValueError(f"{arg} is on {device} but the accumulator's arrays are on "
                             f"{self.device}")
        return state_ops.new_state(self.vocab_size, device)

    def _adopt(self, state) -> None:
        self.stats, self.n_tied, self.n_skipped = state

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
               backend: str = "auto", check_finite: bool = True, validate: bool = True) -> None:
        """Adds a batch: logits [..., V] with V >= vocab_size, targets of the leading shape.

        check_finite=False admits non-finite logits (say -inf for masked tokens) as long as
        every kept token's logp is finite. A call that raises adds nothing. validate=False
        (with check_finite=False) skips every check that needs a device sync; a token whose
        logp cannot be accumulated is then left out and counted in n_skipped, which
        decompose() reports."""
        device = logits.device if isinstance(logits, torch.Tensor) else self.device
        with self._lock:
            state = self._state_on(device, "logits")
            state_ops.accumulate(logits, targets, *state, ignore_index=ignore_index, backend=backend,
                                 check_finite=check_finite, validate=validate)
            self._adopt(state)

    def update_linear(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                      backend: str = "auto", check_finite: bool = True,
                      block_size: Optional[int] = None) -> None:
        """Adds a batch given as the output layer's input: the logits hidden @ weight.T + bias
        (weight [V, D] with V >= vocab_size) are computed block by block and never held
        (rankops.linear_token_stats). A call that raises adds nothing."""
        from rankops.ops.linear_token_stats import linear_token_stats
        stats = linear_token_stats(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                   vocab_size=self.vocab_size, backend=backend,
                                   check_finite=check_finite, block_size=block_size)
        with self._lock:
            self._update_stats(stats.rank, stats.logp, stats.ties)

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
        for name, x in (("rank", rank), ("logp", logp), ("ties", ties)):
            if x is not None and (x.layout != torch.strided or x.device.type not in ("cpu", "cuda")):
                raise TypeError(f"{name} must be a dense tensor on a CPU or CUDA device, got "
                                f"layout {x.layout} on {x.device}")
        with self._lock:
            self._update_stats(rank, logp, ties)

    def _update_stats(self, rank, logp, ties) -> None:
        state = self._state_on(rank.device, "rank")
        device = state[0].device
        rank = rank.reshape(-1).to(device, torch.int64)
        logp = logp.reshape(-1).to(device)
        n = self.vocab_size
        if bool((rank < -1).any()) or bool((rank >= n).any()):
            raise ValueError(f"rank must lie in [0, {n}) or be -1 (ignored)")
        keep = rank >= 0
        r, lp = rank[keep], logp[keep].to(torch.float64)
        bad = ~state_ops.accumulable(lp)
        if bool(bad.any()):
            raise state_ops.bad_logp_error(int(torch.nonzero(keep)[torch.nonzero(bad)[0, 0], 0]), rank.shape)
        t = None
        if ties is not None:
            t = ties.reshape(-1).to(device, torch.int64)[keep]
            if bool((t < 0).any()) or bool((r + t >= n).any()):
                raise ValueError(f"ties must be >= 0 with rank + ties < vocab_size={n}")
        # All checks are done: from here on the state changes.
        state[1].add_(state_ops.add_tokens(state[0], r, lp, t))
        self._adopt(state)
        if ties is None:
            self.ties_known = False

    def merge(self, other: "RankAccumulator") -> "RankAccumulator":
        """Adds other's statistics into this accumulator (in place) and returns it."""
        if not isinstance(other, RankAccumulator):
            raise TypeError(f"other must be a RankAccumulator, got {type(other).__name__}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge accumulators of vocab_size {self.vocab_size} and "
                             f"{other.vocab_size}")
        with other._lock:  # a snapshot, so no two locks are ever held together
            theirs = (other.stats.clone(), other.n_tied.clone(), other.n_skipped.clone(), other.ties_known)
        with self._lock:
            state_ops.merge_state(self.stats, self.n_tied, self.n_skipped, *theirs[:3])
            self.ties_known = self.ties_known and theirs[3]
        return self

    def all_reduce(self, group=None) -> "RankAccumulator":
        """Sums the state over the processes of a torch.distributed group, in place; returns self.

        One int64 all-reduce (SUM) of the state (never an all-gather), so every process ends with
        the accumulator of all tokens, bit for bit. gloo takes CPU state, nccl CUDA state (CPU
        state is moved to the current GPU for the collective). Call it once: a second call
        would add the totals again."""
        with self._lock:
            *state, self.ties_known = state_ops.all_reduce_state(
                self.stats, self.n_tied, self.n_skipped, group, self.ties_known)
            self._adopt(state)
        return self

    def update_vocab_parallel(self, local_logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                              vocab_size: Optional[int] = None, group=None, ignore_index: int = -100,
                              check_finite: bool = True) -> None:
        """Adds a batch whose vocabulary is split over the group's processes (each holds columns
        [vocab_start, vocab_start + V_local)); see rankops.token_stats_vocab_parallel. Every
        process of the group adds the same tokens, so its accumulators stay equal; all_reduce
        over the data-parallel group only. vocab_size defaults to the accumulator's."""
        from rankops.ops.vocab_parallel import token_stats_vocab_parallel
        local_error = None
        if vocab_size is not None and not isinstance(vocab_size, bool) and isinstance(vocab_size, int) \
                and vocab_size > self.vocab_size:
            local_error = ValueError(f"vocab_size={vocab_size} exceeds the accumulator's "
                                     f"vocab_size={self.vocab_size}")
        # The check above is agreed with the other processes inside the call, before any of
        # them computes: all raise together.
        stats = token_stats_vocab_parallel(local_logits, targets, vocab_start=vocab_start,
                                           vocab_size=self.vocab_size if vocab_size is None else vocab_size,
                                           group=group, ignore_index=ignore_index, check_finite=check_finite,
                                           _local_error=local_error)
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
        """Replaces the state with a state_dict()'s, after checking that some sequence of
        updates could have produced it (rankops.ops.accumulate.check_state); on any error the
        accumulator is left as it was."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("format", "vocab_size", "stats", "n_tied") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        for key in ("format", "vocab_size"):
            if isinstance(state[key], bool) or not isinstance(state[key], int):
                raise TypeError(f"state[{key!r}] must be an int, got {state[key]!r}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state has format {state['format']}, this version reads {STATE_FORMAT}")
        if state["vocab_size"] != self.vocab_size:
            raise ValueError(f"state has vocab_size {state['vocab_size']}, the accumulator "
                             f"{self.vocab_size}")
        ties_known = state.get("ties_known", True)
        if not isinstance(ties_known, bool):
            raise TypeError(f"state['ties_known'] must be a bool, got {ties_known!r}")
        counters = []
        for key in ("n_tied", "n_skipped"):
            value = state.get(key, 0)
            if isinstance(value, int) and not isinstance(value, bool):
                value = torch.tensor(value, dtype=torch.int64)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.numel() != 1:
                raise TypeError(f"state[{key!r}] must be an int or an int64 tensor holding one "
                                f"number, got {value!r}")
            counters.append(value)
        stats = state["stats"]
        state_ops.check_state(stats, *counters, self.vocab_size, ties_known=ties_known)
        new = (stats.to(self.device).contiguous().clone(), counters[0].reshape(()).to(self.device).clone(),
               counters[1].reshape(()).to(self.device).clone())
        with self._lock:
            self._adopt(new)
            self.ties_known = ties_known

    def decompose(self, ties: str = "strict") -> Decomposition:
        """The decomposition of everything added so far; ties="pessimistic" uses rank + ties."""
        if ties == "pessimistic" and not self.ties_known:
            raise ValueError("the tie-pessimistic decomposition needs tie counts, but "
                             "update_stats() was called without ties")
        return state_ops.decompose_state(self.stats, self.n_skipped, ties)

    def __repr__(self) -> str:
        return (f"RankAccumulator(vocab_size={self.vocab_size}, n_tokens={self.n_tokens}, "
                f"device={self.device})")


def _check_device(device):
    """None, or a torch.device this machine has (a clear error for a missing GPU)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available on this machine")
    return device
