"""linear_softmax_grad: the weighted cross-entropy gradient of the output layer, with respect to
its input, weight and bias, block by block over the vocabulary: the [N, V] logits and their
gradient are never held (issue 14; the backward pass of compensated_linear_cross_entropy).

With z = h @ W.T + b and, for each kept row i, the upstream factor scale_i and the row's
logsumexp lse_i (from the forward pass), the gradient of the logits is

    G[i, v] = scale_i * (exp(z[i, v] - lse_i) - [v == t_i])    for v < n_cols, 0 beyond

and the layer's gradients are grad_h = G @ W, grad_W = G.T @ h, grad_b = G.sum(0). For each
block of vocabulary rows [start, stop) this recomputes z_b = h_k @ W_b.T + b_b for the kept rows
only (with the forward's own matmul, rankops/ops/linear_token_stats.py `_logits_block`), forms
G_b in fp32 (float64 for float64 inputs), and adds G_b @ W_b to grad_h while G_b.T @ h_k is
grad_W's block (each weight row belongs to one block, so it is written once). Weight rows at or
beyond n_cols (padding) and ignored rows get zero.

Precision: the logits block is in the inputs' dtype (what the forward ranked and what a model's
lm_head computes); softmax and G_b are formed in fp32 from it; the matmuls run in the inputs'
dtype (G_b rounded to it once, as autograd through F.linear rounds the logits' gradient), and
grad_h sums the blocks in fp32. Memory: one [n_kept, block] logits block, its fp32 softmax and
its rounded copy, an [n_kept, D] fp32 accumulator, and the [V, D] grad_W being returned.
"""
from typing import Optional

import torch

from rankops.ops.linear_token_stats import _logits_block

# The default block: about this many elements of logits per block (a 64 MiB fp32 softmax),
# between MIN_BLOCK rows (small blocks make slow matmuls) and the whole vocabulary.
BLOCK_ELEMENTS = 1 << 24
MIN_BLOCK = 256


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_block(n_rows: int, n_cols: int) -> int:
    """Vocabulary rows per block for n_rows kept rows: ~BLOCK_ELEMENTS logits, a multiple of 128."""
    block = max(MIN_BLOCK, (BLOCK_ELEMENTS // max(n_rows, 1)) // 128 * 128)
    return min(block, n_cols)


def target_logits(h_k: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  t_k: torch.Tensor) -> torch.Tensor:
    """z[i, t_i] for the kept rows h_k [n, D] with targets t_k [n], in the accumulation dtype.

    Computed as the block matmul computes a logit (products summed in fp32, the bias added, one
    rounding to the inputs' dtype), from an [n, D] gather of the weight's target rows: the
    forward pass recovers each row's logsumexp as lse = z_t - logp, which the backward needs.
    It can differ from the block matmul's own value in the last bit (summation order), which
    moves the softmax by that rounding: the size of the logits' own rounding."""
    acc = acc_dtype(h_k.dtype)
    z_t = (h_k.to(acc) * weight[t_k].to(acc)).sum(-1)
    if bias is not None:
        z_t = z_t + bias[t_k].to(acc)
    return z_t.to(h_k.dtype).to(acc)


def linear_softmax_grad(h_k: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        t_k: torch.Tensor, lse_k: torch.Tensor, scale_k: torch.Tensor, n_cols: int,
                        block_size: int, *, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True):
    """(grad_h_k [n, D] fp32 or None, grad_weight [V, D] weight's dtype or None, grad_bias [V]
    bias's dtype or None) of sum_i scale_i * cross_entropy(h_k[i] @ W[:n_cols].T + b, t_k[i]).

    h_k: the kept rows only, [n, D]; t_k in [0, n_cols); lse_k, scale_k: [n] in fp32 (float64
    for float64 inputs). No host sync: the targets enter each block by a scatter-add."""
    acc = acc_dtype(h_k.dtype)
    n_rows, dev = h_k.shape[0], h_k.device
    grad_h = torch.zeros(h_k.shape, dtype=acc, device=dev) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_weight else None
    grad_b = None
    if need_bias and bias is not None:
        grad_b = torch.zeros(bias.shape, dtype=bias.dtype, device=dev)
    if n_rows == 0:
        return grad_h, grad_w, grad_b
    lse_k, scale_k = lse_k.to(acc)[:, None], scale_k.to(acc)
    for start in range(0, n_cols, block_size):
        stop = min(start + block_size, n_cols)
        z = _logits_block(h_k, weight, bias, start, stop, None)    # [n, block], inputs' dtype
        # softmax * scale in place, in fp32 (a new tensor only for 16-bit logits)
        g = z.to(acc).sub_(lse_k).exp_().mul_(scale_k[:, None])
        del z
        # - scale_i at (i, t_i - start) for the rows whose target is in this block; the others
        # add 0 at column 0. A scatter, not a boolean index: no host sync on a GPU.
        in_block = (t_k >= start) & (t_k < stop)
        col = torch.where(in_block, t_k - start, 0)[:, None]
        g.scatter_add_(1, col, torch.where(in_block, -scale_k, 0.0)[:, None])
        if grad_b is not None:
            grad_b[start:stop] = g.sum(0).to(grad_b.dtype)
        g_in = g.to(h_k.dtype)                                      # a no-op in fp32 / float64
        del g
        if grad_h is not None:
            grad_h.add_(torch.mm(g_in, weight[start:stop]))
        if grad_w is not None:
            torch.mm(g_in.t(), h_k, out=grad_w[start:stop])
    return grad_h, grad_w, grad_b
