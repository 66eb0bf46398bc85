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

CompensatedCausalLMLinearLoss is the same loss from the last hidden states and the lm_head's
weight (rankops.compensated_linear_cross_entropy): the [B, T, V] logits are never made.
"""
from typing import Optional

import torch

from rankops.loss import RunningRankStats, compensated_cross_entropy, compensated_linear_cross_entropy


def _check_weights(weights) -> None:
    if weights not in ("batch", "running"):
        raise ValueError(f"weights must be 'batch' or 'running', got {weights!r}")


def _shifted(labels, shift_labels, ignore_index):
    """The causal-LM targets: shift_labels if given, else labels shifted left by one position
    (padded with ignore_index on the right: position j predicts token j + 1, the last nothing)."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("labels is None: the compensated loss needs labels (or shift_labels)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() < 1:
        raise ValueError(f"labels must have a sequence dimension, got shape {tuple(labels.shape)}")
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


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
        _check_weights(weights)
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
        shift_labels = _shifted(labels, shift_labels, ignore_index).to(logits.device)
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


class CompensatedCausalLMLinearLoss:
    """CompensatedCausalLMLoss from hidden states: L = CE + lam * Conf of the logits
    hidden_states @ lm_head_weight.T (+ bias), which are never materialised
    (rankops.compensated_linear_cross_entropy; memory O(B*T * block + V * D)).

    Args:
        lam, weights, decay, min_weight, backend, check_finite, validate: as
            CompensatedCausalLMLoss (backend as compensated_linear_cross_entropy).
        block_size: vocabulary rows per block, as compensated_linear_cross_entropy.

    Called as loss(hidden_states, lm_head_weight, labels, *, bias=None, vocab_size=None,
    num_items_in_batch=None, ignore_index=-100, shift_labels=None): labels [B, T] are shifted
    like transformers' causal-LM loss (position j predicts token j + 1), so hidden_states
    [B, T, D] are used as they are. vocab_size drops padded rows of the weight.

    Example, with a transformers causal LM (Llama, Qwen, Mistral, ...: model.model is the
    decoder stack with its final norm, model.lm_head the output layer); no logits are made:
        >>> loss_fn = CompensatedCausalLMLinearLoss(lam=0.3)
        >>> hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
        >>> loss = loss_fn(hidden, model.lm_head.weight, labels, vocab_size=model.config.vocab_size)
        >>> loss.backward()       # gradients reach the decoder and lm_head (or the tied embedding)

    For any architecture, model.base_model and model.get_output_embeddings().weight name the
    same two things (GPT-2: transformer, lm_head; Pythia: gpt_neox, embed_out).
    outputs.hidden_states[-1] of model(ids, output_hidden_states=True) is the same tensor, but
    that call also computes the logits. Models that transform their logits after the matmul
    (a logit scale, Gemma 2's final soft-capping) are not this loss. Under gradient
    accumulation pass num_items_in_batch, the kept tokens of all micro-batches, as Trainer does.
    """

    def __init__(self, lam: float, *, weights: str = "batch", decay: float = 0.99,
                 min_weight: Optional[float] = None, backend: str = "auto",
                 check_finite: bool = True, validate: bool = True, block_size: Optional[int] = None):
        _check_weights(weights)
        self.lam, self.weights, self.decay, self.min_weight = lam, weights, decay, min_weight
        self.backend, self.check_finite, self.validate = backend, check_finite, validate
        self.block_size = block_size
        self.running: Optional[RunningRankStats] = None

    def __call__(self, hidden_states, lm_head_weight, labels, *, bias=None,
                 vocab_size: Optional[int] = None, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels: Optional[torch.Tensor] = None):
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if not isinstance(lm_head_weight, torch.Tensor):
            raise TypeError(f"lm_head_weight must be a torch.Tensor, got {type(lm_head_weight).__name__}")
        shift_labels = _shifted(labels, shift_labels, ignore_index).to(hidden_states.device)
        n_cols = lm_head_weight.shape[0] if vocab_size is None else vocab_size
        if self.weights == "running" and self.running is None:
            self.running = RunningRankStats(n_cols, decay=self.decay, device=hidden_states.device)
        return compensated_linear_cross_entropy(
            hidden_states, lm_head_weight, shift_labels, self.lam, bias=bias, ignore_index=ignore_index,
            vocab_size=vocab_size, num_items_in_batch=num_items_in_batch, running=self.running,
            min_weight=self.min_weight, backend=self.backend, check_finite=self.check_finite,
            validate=self.validate, block_size=self.block_size)

    def __repr__(self) -> str:
        return (f"CompensatedCausalLMLinearLoss(lam={self.lam}, weights={self.weights!r}, "
                f"min_weight={self.min_weight})")
