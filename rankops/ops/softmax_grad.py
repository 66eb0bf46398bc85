"""softmax_grad: the weighted cross-entropy gradient, written in one pass over the logits.

    grad[i, v] = scale_i * (exp(z[i, v] - lse_i) - [v == t_i])    for v < n_cols
    grad[i, v] = 0                                                 for v >= n_cols (padding)
    grad[i, :] = 0                                                 where t_i == ignore_index

lse_i is the row's logsumexp (from the forward pass), scale_i the row's weight times the
upstream gradient. The result is a new contiguous tensor of the logits' shape and dtype,
computed in fp32 and rounded to nearest even once: the logits are never written to (autograd
may still need them), and there is no other [N, V] temporary.
"""
import torch

from rankops import _ext


def reference(logits, targets, lse, scale, ignore_index, n_cols):
    """The pure-torch backend: logits [N, V], targets [N] int64, lse and scale [N] float32."""
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = targets != ignore_index
    z = logits[:, :n_cols].to(acc_dtype)
    p = torch.exp(z - lse.to(acc_dtype)[:, None])
    p.scatter_add_(1, torch.where(keep, targets, 0)[:, None], -torch.ones_like(p[:, :1]))
    grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    w = torch.where(keep, scale.to(acc_dtype), 0.0)
    grad[:, :n_cols] = torch.where(keep[:, None], p * w[:, None], 0.0).to(logits.dtype)  # +0.0, not -0.0
    return grad


# A torch.library op, so torch.compile (and CUDA graphs) take the backward pass as one opaque
# kernel; the fake version gives the output's shape and dtype.
@torch.library.custom_op("rankops::softmax_grad", mutates_args=())
def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 ignore_index: int, n_cols: int, backend: str) -> torch.Tensor:
    """Dispatches to a backend already resolved by the caller (rankops.ops.token_stats'
    resolve_backend). logits [..., V] any strides; targets of the leading shape, int64,
    contiguous and validated; lse, scale float32 of the leading shape."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64: torch only
    t, lse, scale = targets.reshape(-1), lse.reshape(-1).to(acc), scale.reshape(-1).to(acc)
    if backend == "torch":
        flat = logits.reshape(-1, logits.shape[-1])  # a view whenever the rows can be flattened
        return reference(flat, t, lse, scale, ignore_index, n_cols).view(logits.shape)
    # Allocated in the logits' shape and handed back as is (not as a view): autograd then
    # adopts it as the .grad of a leaf instead of copying it.
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    # The kernels walk the logits' own strides: per-row tensors of the leading shape.
    t, lse, scale = (x.contiguous().view(logits.shape[:-1]) for x in (t, lse, scale))
    if backend == "cpu":
        _ext.cpu_softmax_grad(logits, t, lse, scale, ignore_index, n_cols, grad)
    elif backend == "triton":
        from rankops.ops import softmax_grad_triton
        softmax_grad_triton.launch(logits, t, lse, scale, ignore_index, n_cols, grad)
    elif backend == "cuda":
        _ext.cuda_softmax_grad(logits, t, lse, scale, ignore_index, n_cols, grad)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return grad

@softmax_grad.register_fake
def _(logits, targets, lse, scale, ignore_index, n_cols, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
