"""The compensated loss as a transformers loss function, for Trainer and for model.loss_function.

One object serves both places transformers calls a loss:

- `model.loss_function = loss`: called as loss(logits, labels, vocab_size, num_items_in_batch,
  ignore_index, shift_labels, **kwargs), the signature of transformers' ForCausalLMLoss;
- `Trainer(compute_loss_func=loss)`: called as loss(outputs, labels, num_items_in_batch).

Like ForCausalLMLoss, labels are shifted by padding them with ignore_index on the right, so the
logits are used as they are (no [N, V] copy; in particular no upcast to float32: the kernels
accumulate in fp32 from any input dtype). Under gradient accumulation transformers passes
num_items_in_batch, the kept tokens of all micro-batches, and the summed loss is divided by it.
With lam = 0 that reproduces the full batch's mean cross-entropy exactly; with lam != 0 each
micro-batch contributes its own Confidence term weighted by its share of the tokens (or, with
weights="running", all micro-batches read one running estimate of P and Q).
"""
from typing import Optional

import torch

from rankops.loss import RunningRankStats, compensated_cross_entropy


class CompensatedCausalLMLoss:
    """L = CE + lam * Conf for causal language models, in transformers' loss-function shape.

    Args:
        lam: the weight of Confidence (0 is transformers' own causal-LM loss).
        weights: "batch" (P and Q of each call's tokens) or "running" (a RunningRankStats with
            the given decay, created on first use with the model's vocab_size).
        min_weight, backend, check_finite, validate: as rankops.compensated_cross_entropy.

    Example:
        >>> loss = CompensatedCausalLMLoss(lam=0.3)
        >>> model.loss_function = loss                     # model(..., labels=...) uses it
        >>> trainer = Trainer(model, args, compute_loss_func=loss, ...)
    """

    def __init__(self, lam: float, *, weights: str = "batch", decay: float = 0.99,
                 min_weight: Optional[float] = None, backend: str = "auto",
                 check_finite: bool = True, validate: bool = True):
        if weights not in ("batch", "running"):
            raise ValueError(f"weights must be 'batch' or 'running', got {weights!r}")
        self.lam, self.weights, self.decay, self.min_weight = lam, weights, decay, min_weight
        self.backend, self.check_finite, self.validate = backend, check_finite, validate
        self.running: Optional[RunningRankStats] = None

    def __call__(self, logits, labels, vocab_size: Optional[int] = None, num_items_in_batch=None,
                 ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None, **kwargs):
        if not isinstance(logits, torch.Tensor):  # Trainer's compute_loss_func(outputs, labels, ...)
            outputs = logits
            logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
            if logits is None:
                raise TypeError("compute_loss_func was given model outputs without logits")
        if labels is None and shift_labels is None:
            raise ValueError("labels is None: the compensated loss needs labels (or shift_labels)")
        if shift_labels is None:
            # Position j predicts token j + 1; the last position predicts nothing.
            padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        shift_labels = shift_labels.to(logits.device)
        n_cols = logits.shape[-1] if vocab_size is None else vocab_size
        if self.weights == "running" and self.running is None:
            self.running = RunningRankStats(n_cols, decay=self.decay, device=logits.device)
        return compensated_cross_entropy(
            logits, shift_labels, self.lam, ignore_index=ignore_index, vocab_size=vocab_size,
            num_items_in_batch=num_items_in_batch, running=self.running, min_weight=self.min_weight,
            backend=self.backend, check_finite=self.check_finite, validate=self.validate)

    def __repr__(self) -> str:
        return (f"CompensatedCausalLMLoss(lam={self.lam}, weights={self.weights!r}, "
                f"min_weight={self.min_weight})")
