"""The pure-torch reference backend of every op: the definitions of docs/DESIGN.md, in code.

Every other backend is tested against these. They favour clarity over speed and memory: they
materialise [N, V] temporaries. Inputs are flat: logits [N, V], targets [N] int64 (valid or
ignore_index), per-row vectors [N].
"""
import torch


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    # Upcasting is exact, so comparisons are unaffected; logp needs fp32 or better.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _logsumexp(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 as float64: m + log(sum exp(z - m)), the exponentials in z's dtype,
    their sum and the rest in float64. In fp32, torch's sum of the exponentials is biased (logp
    +2.8e-8 on SmolLM2's logits), and m + log(s) and z_t - lse round at the scale of the logits
    (|m| ~ 20: steps of 2e-6), noise that hides such a bias (docs/DESIGN.md, "Accuracy of logp").
    The row max is the answer where it is not finite: NaN if any value is NaN, +inf if any is
    +inf, -inf if all are -inf."""
    if z.shape[1] == 0:
        return torch.full(z.shape[:1], float("-inf"), dtype=torch.float64, device=z.device)
    m = z.amax(dim=1)                                  # [N]; amax propagates NaN
    finite = torch.isfinite(m)
    m0 = torch.where(finite, m, torch.zeros_like(m))
    s = torch.exp(z - m0[:, None]).sum(dim=1, dtype=torch.float64)  # [N], >= 1 for finite rows
    return torch.where(finite, m0.double() + torch.log(s), m.double())


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
    logp = (z_t.squeeze(1).double() - _logsumexp(z.to(acc))).to(acc)
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
