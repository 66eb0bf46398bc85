"""The pure-torch reference backend of every op: the definitions of docs/DESIGN.md, in code.

Every other backend is tested against these. They favour clarity over speed and memory: they
materialise [N, V] temporaries. Inputs are flat: logits [N, V], targets [N] int64 (valid or
ignore_index), per-row vectors [N].
"""
import torch


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    # Upcasting is exact, so comparisons are unaffected; logp needs fp32 or better.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_stats(logits, targets, ignore_index: int, n_cols: int, target_logit=None):
    """Returns rank, ties, logp and non-finite flags [N].

    rank = #{v : z_v > z_t}, ties = #{v != t : z_v == z_t}, logp = z_t - logsumexp(z), over the
    first n_cols columns. With target_logit ([N], the value of z_t, from another shard say) the
    target's column is not read and ties counts every equal column (the target's own included,
    if it lies here). Ignored rows: rank -1, ties 0, logp 0.0, flag 0."""
    z = logits[:, :n_cols]                        # [N, n_cols]; padded columns never count
    keep = targets != ignore_index                # [N]
    if target_logit is None:
        z_t = z.gather(1, torch.where(keep, targets, 0)[:, None])  # [N, 1], the logits' dtype
        own = (z_t == z_t).squeeze(1).long()       # the target is not its own tie (NaN: no tie)
    else:
        z_t = target_logit.to(logits.dtype)[:, None]  # exact: it came from this dtype
        own = 0
    rank = (z > z_t).sum(dim=1)                   # strict: ties do not raise the rank
    ties = (z == z_t).sum(dim=1) - own
    acc = _acc_dtype(logits)
    logp = z_t.squeeze(1).to(acc) - torch.logsumexp(z.to(acc), dim=1)
    flags = ~torch.isfinite(z).all(dim=1) & keep
    return (torch.where(keep, rank, -1), torch.where(keep, ties, 0), torch.where(keep, logp, 0.0),
            flags.to(torch.int32))


def softmax_grad(logits, targets, lse, scale, ignore_index: int, n_cols: int):
    """grad = scale_i (softmax(z_i) - onehot(t_i)) on the first n_cols columns, 0 elsewhere and on
    ignored rows; the logits' dtype and shape. lse and scale: [N]."""
    acc = _acc_dtype(logits)
    keep = targets != ignore_index
    z = logits[:, :n_cols].to(acc)
    p = torch.exp(z - lse.to(acc)[:, None])
    p.scatter_add_(1, torch.where(keep, targets, 0)[:, None], -torch.ones_like(p[:, :1]))
    grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    w = torch.where(keep, scale.to(acc), 0.0)
    grad[:, :n_cols] = torch.where(keep[:, None], p * w[:, None], 0.0).to(logits.dtype)  # +0.0, not -0.0
    return grad
