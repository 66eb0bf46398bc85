"""CrossEntropyDecomposition: the rankops decomposition as a torchmetrics Metric.

The state is RankAccumulator's (exact int64 fixed point, [6, vocab_size] plus two counters), so
processes merge by integer addition and a distributed compute() equals the single-process
result bit for bit. torchmetrics' default sync all-gathers every state and then sums, which
for a [6, 150k] state on many GPUs moves world_size times more data than needed; this metric
sums all its states with one torch.distributed.all_reduce instead.

Example:
    >>> from rankops.integrations.torchmetrics import CrossEntropyDecomposition
    >>> metric = CrossEntropyDecomposition(vocab_size=50257).to(device)
    >>> for logits, targets in batches:
    ...     metric.update(logits, targets)
    >>> metric.compute()["error_entropy"]     # a dict of 0-d tensors, global under DDP
    >>> metric.decomposition()                # the full rankops.Decomposition
"""
from typing import Optional, Union

import torch
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from rankops.accumulate import RankAccumulator, normalize_carry
from rankops.decompose import TIE_MODES, Decomposition
from rankops.distributed import all_reduce_tensor
from rankops.ops.token_stats import BACKENDS, check_sync_options


class CrossEntropyDecomposition(Metric):
    """Corpus cross-entropy split into Error-Entropy, Self-Alignment and Confidence.

    update(logits, targets) takes logits [..., V] (V >= vocab_size; padded columns beyond
    vocab_size are dropped) and integer targets of the leading shape, ignore_index dropped,
    exactly as RankAccumulator.update. compute() returns a dict of 0-d tensors on the metric's
    device: cross_entropy, error_entropy, self_alignment, confidence, error_entropy_share
    (EE/CE), error_entropy_magnitude_share, top1_accuracy, mean_reciprocal_rank, tie_rate
    (float64) and n_tokens (int64). decomposition() returns the rankops.Decomposition itself
    (with P, Q and the per-rank counts); it cannot be compute()'s value because torchmetrics
    maps over compute()'s result, which a frozen dataclass refuses.

    ties="pessimistic" reports the decomposition by rank + ties. backend, check_finite and
    validate are RankAccumulator.update's. Other keyword arguments go to torchmetrics.Metric
    (process_group, sync_on_compute, dist_sync_on_step, ...). A dist_sync_fn of your own
    selects torchmetrics' gather-then-sum sync; without one the states are all-reduced.

    Unlike torchmetrics' default forward, a forward() or update() that raises (bad input,
    non-finite logits) leaves the accumulated state as it was.
    """

    full_state_update = False
    higher_is_better = False  # for cross-entropy, the headline value
    is_differentiable = False

    def __init__(self, vocab_size: int, *, ignore_index: int = -100, ties: str = "strict",
                 backend: str = "auto", check_finite: bool = True, validate: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        probe = RankAccumulator(vocab_size, device="meta")  # checks vocab_size, allocates nothing
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_sync_options(check_finite, validate)
        self.vocab_size = probe.vocab_size
        self.ignore_index = ignore_index
        self.ties = ties
        self.backend = backend
        self.check_finite = check_finite
        self.validate = validate
        # Rows as in rankops.accumulate (COUNT, SUM_HI, SUM_LO, and the tie-pessimistic three).
        self.add_state("stats", torch.zeros(6, vocab_size, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_tied", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("n_skipped", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulator(self) -> RankAccumulator:
        """A RankAccumulator whose arrays are this metric's state tensors (shared, not copied)."""
        acc = RankAccumulator(self.vocab_size, device="meta")  # device fixed: no silent moves
        acc.stats, acc.n_tied, acc.n_skipped = self.stats, self.n_tied, self.n_skipped
        return acc

    def _add(self, acc: RankAccumulator) -> None:
        self.stats = self.stats + acc.stats.to(self.stats.device)
        self.n_tied = self.n_tied + acc.n_tied.to(self.stats.device)
        self.n_skipped = self.n_skipped + acc.n_skipped.to(self.stats.device)
        normalize_carry(self.stats)

    def _add_batch(self, acc: RankAccumulator, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # RankAccumulator.update adds nothing when it raises.
        acc.update(logits, targets, ignore_index=self.ignore_index, backend=self.backend,
                   check_finite=self.check_finite, validate=self.validate)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch: logits [..., V] and targets [...] (ignore_index entries dropped)."""
        acc = self._accumulator()
        self._add_batch(acc, logits, targets)
        self.stats, self.n_tied, self.n_skipped = acc.stats, acc.n_tied, acc.n_skipped

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """Adds the batch and returns the batch's own compute() dict.

        Replaces torchmetrics' forward, which resets the state before the batch update and so
        would lose everything accumulated if the update raised. Here the batch is accumulated
        on its own and added only once it succeeded. With dist_sync_on_step=True the batch
        value is over every process's batch (one all_reduce)."""
        if self._is_synced:
            raise TorchMetricsUserError("The metric is synced; call unsync() before forward().")
        with torch.no_grad():
            batch = RankAccumulator(self.vocab_size, device=self.stats.device)
            self._add_batch(batch, logits, targets)
            self._add(batch)
            self._update_count += 1
            self._computed = None
            if self.dist_sync_on_step and self.distributed_available_fn():
                batch.stats, batch.n_tied, batch.n_skipped = _all_reduce_sum(
                    (batch.stats, batch.n_tied, batch.n_skipped), self.process_group)
            self._forward_cache = _result_dict(batch, self.ties, self.stats.device)
        return self._forward_cache

    def compute(self) -> dict:
        """The global result so far, as a dict of 0-d tensors (see the class docstring)."""
        return _result_dict(self._accumulator(), self.ties, self.stats.device)

    def decomposition(self, ties: Optional[str] = None) -> Decomposition:
        """The rankops.Decomposition of everything accumulated (over all processes under DDP,
        like compute()); ties defaults to the metric's own."""
        ties = self.ties if ties is None else ties
        synced_by_caller = self._is_synced  # after a sync() of the caller's: use it, keep it
        with self.sync_context(dist_sync_fn=self.dist_sync_fn,
                               should_sync=self._to_sync and not synced_by_caller,
                               should_unsync=not synced_by_caller):
            return self._accumulator().decompose(ties)

    def merge_state(self, incoming_state: Union[dict, Metric, RankAccumulator]) -> None:
        """Adds another CrossEntropyDecomposition's state, a dict of states ("stats",
        "n_tied", "n_skipped"; RankAccumulator.state_dict() qualifies), or a RankAccumulator."""
        if isinstance(incoming_state, CrossEntropyDecomposition):
            if incoming_state.vocab_size != self.vocab_size:
                raise ValueError(f"cannot merge a metric of vocab_size {incoming_state.vocab_size} "
                                 f"into one of vocab_size {self.vocab_size}")
            incoming_state = incoming_state.metric_state
        elif isinstance(incoming_state, RankAccumulator):
            incoming_state = incoming_state.state_dict()
        elif not isinstance(incoming_state, dict):
            raise TypeError(f"incoming_state must be a CrossEntropyDecomposition, a dict of its "
                            f"states or a RankAccumulator, got {type(incoming_state).__name__}")
        missing = [k for k in ("stats", "n_tied") if k not in incoming_state]
        if missing:
            raise ValueError(f"incoming_state is missing {missing}")
        if "vocab_size" in incoming_state and incoming_state["vocab_size"] != self.vocab_size:
            raise ValueError(f"incoming_state has vocab_size {incoming_state['vocab_size']}, the "
                             f"metric {self.vocab_size}")
        if not incoming_state.get("ties_known", True):
            raise ValueError("incoming_state has no tie counts (update_stats() without ties)")
        stats = incoming_state["stats"]
        if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 \
                or tuple(stats.shape) != (6, self.vocab_size):
            raise ValueError(f"incoming_state['stats'] must be an int64 tensor of shape "
                             f"(6, {self.vocab_size})")
        other = RankAccumulator(self.vocab_size, device="meta")
        other.stats = stats
        other.n_tied = torch.as_tensor(incoming_state["n_tied"], dtype=torch.int64)
        other.n_skipped = torch.as_tensor(incoming_state.get("n_skipped", 0), dtype=torch.int64)
        self._add(other)
        self._computed = None

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        """Sums the states over processes with one all_reduce (torchmetrics' default gathers
        each state from every process, then sums). A dist_sync_fn of the user's own keeps
        torchmetrics' gather path."""
        if dist_sync_fn not in (None, gather_all_tensors):
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            normalize_carry(self.stats)
            return
        self.stats, self.n_tied, self.n_skipped = _all_reduce_sum(
            (self.stats, self.n_tied, self.n_skipped), process_group or self.process_group)

    def set_dtype(self, dst_type) -> "CrossEntropyDecomposition":
        """Does nothing: the state is exact integer fixed point and the results float64."""
        return self

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, ties={self.ties!r}"


def _all_reduce_sum(states, group) -> tuple:
    """Sums int64 tensors over the group's processes with a single all_reduce of one packed
    buffer; returns new tensors (the inputs are left as they were)."""
    flat = torch.cat([s.reshape(-1) for s in states])
    flat = all_reduce_tensor(flat, "sum", group, flat.device)  # on the group's device (nccl: a GPU)
    out, start = [], 0
    for s in states:
        out.append(flat[start:start + s.numel()].view(s.shape))
        start += s.numel()
    # Each process's lo words are < 2^32, so their sum fits int64 until 2^31 processes.
    normalize_carry(out[0])
    return tuple(out)


def _result_dict(acc: RankAccumulator, ties: str, device: torch.device) -> dict:
    d = acc.decompose(ties)
    values = {
        "cross_entropy": d.cross_entropy,
        "error_entropy": d.error_entropy,
        "self_alignment": d.self_alignment,
        "confidence": d.confidence,
        "error_entropy_share": d.error_entropy_share,
        "error_entropy_magnitude_share": d.error_entropy_magnitude_share,
        "top1_accuracy": d.top1_accuracy,
        "mean_reciprocal_rank": d.mean_reciprocal_rank,
        "tie_rate": acc.tie_rate,
    }
    out = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in values.items()}
    out["n_tokens"] = torch.tensor(d.n_tokens, dtype=torch.int64, device=device)
    return out
