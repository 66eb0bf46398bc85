"""The pure-torch reference backend: the definitions of DESIGN.md section 1, in code.

Every other backend is tested against this one. It favours clarity over speed and memory: it
materialises [N, V] temporaries.
"""
import torch


def token_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int):
    """logits [N, V] (any float dtype), targets [N] int64, valid. Returns rank, ties, logp [N]."""
    z = logits[:, :n_cols]                        # [N, n_cols]; padded columns never count
    keep = targets != ignore_index                # [N]
    t = torch.where(keep, targets, 0)
    z_t = z.gather(1, t[:, None])                 # [N, 1], in the logits' own dtype
    rank = (z > z_t).sum(dim=1)                   # strict: ties do not raise the rank
    ties = (z == z_t).sum(dim=1) - (z_t == z_t).squeeze(1).long()  # the target is not its own tie
    # Upcasting is exact, so ranks above equal those of the raw dtype; logp needs >= fp32.
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = z_t.squeeze(1).to(acc_dtype) - torch.logsumexp(z.to(acc_dtype), dim=1)
    rank = torch.where(keep, rank, -1)
    ties = torch.where(keep, ties, 0)
    logp = torch.where(keep, logp, 0.0)
    return rank, ties, logp


def has_nonfinite_row(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int):
    """Index of the first kept row with a NaN or +-inf among its first n_cols logits, or None."""
    bad = ~torch.isfinite(logits[:, :n_cols]).all(dim=1) & (targets != ignore_index)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else None
