"""softmax_grad: the weighted cross-entropy gradient, written in one pass over the logits.

    grad[i, v] = scale_i * (exp(z[i, v] - lse_i) - [v == t_i])    for v < n_cols
    grad[i, v] = 0                                                 for v >= n_cols (padding)
    grad[i, :] = 0                                                 where t_i == ignore_index

lse_i is the row's logsumexp (from the forward pass), scale_i the row's weight times the
upstream gradient. The result is a new contiguous tensor of the logits' shape and dtype,
computed in fp32 and rounded to nearest even once: the logits are never written to (autograd
may still need them), and there is no other [N, V] temporary. The compensated loss's backward
pass (rankops/loss.py) is its caller; read top-down: the torch.library op, the per-backend launch.
"""
import torch

from rankops import _ext
from rankops.ops import reference


# A torch.library op, so torch.compile (and CUDA graphs) take the backward pass as one opaque
# kernel; the fake version gives the output's shape and dtype.
@torch.library.custom_op("rankops::softmax_grad", mutates_args=())
def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 ignore_index: int, n_cols: int, backend: str) -> torch.Tensor:
    """logits [..., V] any strides; targets of the leading shape, int64, contiguous and checked;
    lse, scale of the leading shape; backend already resolved (rankops.ops.common.prepare)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64: torch only
    lse, scale = lse.to(acc).contiguous(), scale.to(acc).contiguous()
    if backend == "torch":
        flat = logits.reshape(-1, logits.shape[-1])
        return reference.softmax_grad(flat, targets.reshape(-1), lse.reshape(-1), scale.reshape(-1),
                                      ignore_index, n_cols).view(logits.shape)
    # Allocated in the logits' shape and handed back as is (not as a view): autograd then
    # adopts it as the .grad of a leaf instead of copying it.
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch(logits, targets, lse, scale, ignore_index, n_cols, backend, grad)
    return grad


@softmax_grad.register_fake
def _(logits, targets, lse, scale, ignore_index, n_cols, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def launch(logits, targets, lse, scale, ignore_index, n_cols, backend, grad) -> None:
    """The one call into each compiled backend; grad is written in full."""
    if backend == "cpu":
        _ext.cpu_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad)
    elif backend == "triton":
        from rankops.ops import softmax_grad_triton
        softmax_grad_triton.launch(logits, targets, lse, scale, ignore_index, n_cols, grad)
    elif backend == "cuda":
        _ext.cuda_softmax_grad(logits, targets, lse, scale, ignore_index, n_cols, grad)
    else:
        raise ValueError(f"unknown backend {backend!r}")
