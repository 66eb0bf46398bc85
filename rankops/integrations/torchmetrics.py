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

from rankops.accumulate import RankAccumulator
from rankops.decompose import TIE_MODES, Decomposition
from rankops.ops import accumulate as state_ops
from rankops.ops.common import BACKENDS, check_flags


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

    The states are the accumulator's (rankops.ops.accumulate), written by its functional core.
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
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if ties not in TIE_MODES:
            raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_flags(check_finite, validate)
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.ties = ties
        self.backend = backend
        self.check_finite = check_finite
        self.validate = validate
        stats, n_tied, n_skipped = state_ops.new_state(vocab_size)
        self.add_state("stats", stats, dist_reduce_fx="sum")
        self.add_state("n_tied", n_tied, dist_reduce_fx="sum")
        self.add_state("n_skipped", n_skipped, dist_reduce_fx="sum")

    def _state(self) -> tuple:
        return self.stats, self.n_tied, self.n_skipped

    def _accumulate(self, state, logits: torch.Tensor, targets: torch.Tensor) -> None:
        # Adds nothing when it raises.
        state_ops.accumulate(logits, targets, *state, ignore_index=self.ignore_index, backend=self.backend,
                             check_finite=self.check_finite, validate=self.validate)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Adds a batch: logits [..., V] and targets [...] (ignore_index entries dropped)."""
        self._accumulate(self._state(), logits, targets)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """Adds the batch and returns the batch's own compute() dict.

        Replaces torchmetrics' forward, which resets the state before the batch update and so
        would lose everything accumulated if the update raised. Here the batch is accumulated
        on its own and added only once it succeeded. With dist_sync_on_step=True the batch
        value is over every process's batch (one all_reduce)."""
        if self._is_synced:
            raise TorchMetricsUserError("The metric is synced; call unsync() before forward().")
        with torch.no_grad():
            batch = state_ops.new_state(self.vocab_size, self.stats.device)
            self._accumulate(batch, logits, targets)
            state_ops.merge_state(*self._state(), *batch)
            self._update_count += 1
            self._computed = None
            if self.dist_sync_on_step and self.distributed_available_fn():
                batch = state_ops.all_reduce_state(*batch, self.process_group)[:3]
            self._forward_cache = _result_dict(batch, self.ties)
        return self._forward_cache

    def compute(self) -> dict:
        """The global result so far, as a dict of 0-d tensors (see the class docstring)."""
        return _result_dict(self._state(), self.ties)

    def decomposition(self, ties: Optional[str] = None) -> Decomposition:
        """The rankops.Decomposition of everything accumulated (over all processes under DDP,
        like compute()); ties defaults to the metric's own."""
        ties = self.ties if ties is None else ties
        synced_by_caller = self._is_synced  # after a sync() of the caller's: use it, keep it
        with self.sync_context(dist_sync_fn=self.dist_sync_fn,
                               should_sync=self._to_sync and not synced_by_caller,
                               should_unsync=not synced_by_caller):
            return state_ops.decompose_state(self.stats, self.n_skipped, ties)

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
        other = (incoming_state["stats"], torch.as_tensor(incoming_state["n_tied"], dtype=torch.int64),
                 torch.as_tensor(incoming_state.get("n_skipped", 0), dtype=torch.int64))
        state_ops.check_state(*other, self.vocab_size, where="incoming_state")
        state_ops.merge_state(*self._state(), *other)
        self._computed = None

    def _sync_dist(self, dist_sync_fn=gather_all_tensors, process_group=None) -> None:
        """Sums the states over processes with one all_reduce (torchmetrics' default gathers
        each state from every process, then sums). A dist_sync_fn of the user's own keeps
        torchmetrics' gather path."""
        if dist_sync_fn not in (None, gather_all_tensors):
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            state_ops.normalize_carry(self.stats)
            return
        self.stats, self.n_tied, self.n_skipped, _ = state_ops.all_reduce_state(
            *self._state(), process_group or self.process_group)

    def set_dtype(self, dst_type) -> "CrossEntropyDecomposition":
        """Does nothing: the state is exact integer fixed point and the results float64."""
        return self

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, ties={self.ties!r}"


def _result_dict(state, ties: str) -> dict:
    stats, n_tied, n_skipped = state
    d = state_ops.decompose_state(stats, n_skipped, ties)
    values = {
        "cross_entropy": d.cross_entropy,
        "error_entropy": d.error_entropy,
        "self_alignment": d.self_alignment,
        "confidence": d.confidence,
        "error_entropy_share": d.error_entropy_share,
        "error_entropy_magnitude_share": d.error_entropy_magnitude_share,
        "top1_accuracy": d.top1_accuracy,
        "mean_reciprocal_rank": d.mean_reciprocal_rank,
        "tie_rate": int(n_tied) / max(d.n_tokens, 1),
    }
    device = stats.device
    out = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in values.items()}
    out["n_tokens"] = torch.tensor(d.n_tokens, dtype=torch.int64, device=device)
    return out
