"""token_stats over logits whose vocabulary is split across the processes of a group.

Each process holds columns [vocab_start, vocab_start + V_local) of every row (a tensor-parallel
output layer). The target's logit is found once (by its owner, a gather of one element per
row) and shared by a MAX all-reduce; then each process's shard is read ONCE by the token_stats
kernel in its target-logit mode, which counts the shard's larger and equal logits and gives its
logsumexp (as logp = z_t - lse). The counts add exactly; the shards' logsumexps combine as
M + log sum exp(lse_s - M) with M their maximum. Every collective carries O(N) values.

Rows whose shard result is not finite (a -inf target, a shard of only -inf, NaN or +inf with
check_finite=False) take the reference path on those rows alone, so the non-finite semantics
are the reference's (docs/DESIGN.md, "Definitions").

Every argument check that one process could fail alone is agreed through a collective before
anyone raises, so all processes raise together instead of leaving the others waiting.
"""
import itertools
from typing import Optional

import torch

from rankops import _ext, distributed
from rankops.ops.common import (check_flags, check_inputs, nonfinite_error, resolve_backend,
                                row_position)
from rankops.ops.token_stats import TokenStats, token_stats_op

# The reference backend materialises [rows, V_local] temporaries: at most this many elements.
CHUNK_ELEMENTS = 1 << 22
# The logits' dtype in the agreement table: the kernels' one numbering (rankops._ext), and
# float64 (the torch backend's alone) after it.
_DTYPE_CODES = {**_ext.DTYPE_CODES, torch.float64: len(_ext.DTYPE_CODES)}
_NONE = float("-inf")


def token_stats_vocab_parallel(local_logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                               vocab_size: Optional[int] = None, group=None, ignore_index: int = -100,
                               check_finite: bool = True, backend: str = "auto",
                               _local_error: Optional[Exception] = None) -> TokenStats:
    """rankops.token_stats on logits whose vocabulary is split over the group's processes.

    Each process passes its own columns [vocab_start, vocab_start + V_local) of every row (as
    tensor-parallel output layers produce them) and the same targets (global vocabulary
    indices). Every process gets the TokenStats of the concatenated logits: rank and ties
    exactly, logp within a few fp32 ulp of the unsharded value (the shards' sums of exp add in
    another order). Each shard is read once; O(N) values per process are exchanged.

    Args:
        local_logits: [..., V_local], float32, bfloat16, float16 or float64, any strides.
        targets: integer tensor of the leading shape, identical on every process.
        vocab_start: the global index of this process's first column. The shards must tile
            [0, sum of V_local) without gaps or overlaps (checked).
        vocab_size: the global number of real columns; columns at or past it are padding and
            never count (default: all columns).
        group: the process group holding the shards (default: the world).
        ignore_index, check_finite, backend: as in rankops.token_stats.
        _local_error: for callers with checks of their own (RankAccumulator): an error this
            process found, agreed with the others like the argument checks here.

    Example (2 processes, vocabulary 50304 split in halves):
        >>> s = rankops.token_stats_vocab_parallel(logits[..., 25152 * rank:25152 * (rank + 1)],
        ...                                        targets, vocab_start=25152 * rank, vocab_size=50277)
    """
    dist = distributed.dist()
    world = dist.get_world_size(group)
    local_error = _local_error
    try:
        check_flags(check_finite, True)
        check_inputs(local_logits, targets, ignore_index, None)
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
            raise TypeError(f"vocab_start must be an int, got {vocab_start!r}")
        if not 0 <= vocab_start < 2 ** 62:
            raise ValueError(f"vocab_start must be >= 0 (and below 2^62), got {vocab_start}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
        if vocab_size is not None and not 1 <= vocab_size < 2 ** 62:
            raise ValueError(f"vocab_size must be >= 1 (and below 2^62), got {vocab_size}")
        backend = resolve_backend(backend, local_logits)
    except (TypeError, ValueError) as exc:
        local_error = local_error or exc
    # A process whose arguments failed takes part in the agreement on the CPU (its tensors may
    # be anywhere, the meta device included); nccl needs the same device everywhere.
    device = local_logits.device if local_error is None else torch.device("cpu")

    # 1. Every process's shard and arguments, one row each (zeros where they failed: column 0
    # says which did). Everyone then checks the same table and agrees.
    row = None if local_error is not None else [
        1, vocab_start, local_logits.shape[-1], targets.numel(), -1 if vocab_size is None else vocab_size,
        _DTYPE_CODES[local_logits.dtype], ignore_index, int(check_finite)]
    table = distributed.exchange_rows(row, 8, group, device)
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if table[r][0] == 0]
    if failed:
        raise ValueError(f"process(es) {failed} of the group rejected their arguments to "
                         "token_stats_vocab_parallel (see their error); nothing was computed")
    n_total = _check_shards(table)
    n_cols = n_total if vocab_size is None else vocab_size
    if not 1 <= n_cols <= n_total:
        raise ValueError(f"vocab_size must be in [1, {n_total}] (the shards' total columns), got {vocab_size}")
    n_local = max(0, min(n_cols - vocab_start, local_logits.shape[-1]))  # real columns held here

    t = targets.reshape(-1).to(torch.int64)
    keep = t != ignore_index
    in_range = (t >= 0) & (t < n_cols)
    valid = keep & in_range
    z_t = _target_logit(local_logits, t, valid, vocab_start, n_local, targets, ignore_index, n_cols, group)

    # 2. One read of the shard: larger and equal counts and the shard's logsumexp per row.
    greater, equal, lse, first_bad = _shard_stats(local_logits, targets, z_t, ignore_index, n_local, backend)

    # 3. Non-finite rows, then the shards combined: a MAX of each row's lse (and of the first
    # non-finite row, negated), then a SUM of the counts and of exp(lse - M).
    neg_first_bad = torch.where(first_bad == _NONE, _NONE, -first_bad).reshape(1)
    top = distributed.all_reduce_tensor(torch.cat([torch.where(lse.isnan(), _NONE, lse),
                                                   lse.isnan().to(torch.float64), neg_first_bad]),
                                        "max", group, device)
    n_rows = t.numel()
    lse_max, any_nan, neg_first_bad = top[:n_rows], top[n_rows:2 * n_rows] > 0, top[-1].item()
    if check_finite and neg_first_bad != _NONE:
        raise nonfinite_error(int(-neg_first_bad), targets.shape)
    shift = torch.where(lse_max.isinf(), 0.0, lse_max)  # as torch.logsumexp: no inf - inf
    sums = torch.stack([greater.to(torch.float64), equal.to(torch.float64), torch.exp(lse - shift)])
    sums = distributed.all_reduce_tensor(sums, "sum", group, device)  # counts exact below 2^53

    compute_dtype = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
    ties = sums[1].to(torch.int64) - (z_t == z_t).to(torch.int64)  # the target is not its own tie
    logp = z_t - (shift + sums[2].log())
    logp = torch.where(any_nan, float("nan"), logp)
    rank = torch.where(keep, sums[0].to(torch.int64), -1).view(targets.shape)
    ties = torch.where(keep, ties, 0).view(targets.shape)
    logp = torch.where(keep, logp, 0.0).to(compute_dtype).view(targets.shape)
    return TokenStats(rank, ties, logp)


def _target_logit(local_logits, t, valid, vocab_start, n_local, targets, ignore_index, n_cols, group):
    """[N] float64, on every process: the target's logit (exact), NaN where it is NaN. Raises
    on every process for a target out of range or targets that differ between processes."""
    device = local_logits.device
    n_rows = t.numel()
    col = t - vocab_start
    owned = valid & (col >= 0) & (col < n_local)
    z_t = torch.zeros(n_rows, dtype=torch.float64, device=device)
    if n_local:
        idx = torch.nonzero(owned)[:, 0]
        lead = torch.unravel_index(idx, tuple(targets.shape))  # any strides: no copy of the shard
        z_t[idx] = local_logits[lead + (col[idx],)].to(torch.float64)
    # One MAX all-reduce of [4, N] and a scalar: target logit (-inf where not owned), target
    # logit is NaN, target and -target (equal on every process iff the targets agree); then
    # -(first bad target row). NaN travels as a flag because MAX does not propagate it reliably.
    packed = torch.full((4, n_rows), _NONE, dtype=torch.float64, device=device)
    packed[0] = torch.where(owned & ~z_t.isnan(), z_t, _NONE)
    packed[1] = (owned & z_t.isnan()).to(torch.float64)
    kept_t = torch.where(valid, t, -1).to(torch.float64)
    packed[2], packed[3] = kept_t, -kept_t
    bad_target = torch.nonzero((t != ignore_index) & ~valid)
    scalars = torch.tensor([-float(bad_target[0, 0]) if bad_target.numel() else _NONE],
                           dtype=torch.float64, device=device)
    reduced = distributed.all_reduce_tensor(torch.cat([packed.reshape(-1), scalars]), "max", group, device)
    packed, first_bad_target = reduced[:-1].view(4, n_rows), reduced[-1].item()
    if first_bad_target != _NONE:
        row = int(-first_bad_target)
        raise ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                         f"found {int(t[row])} at position {row_position(row, targets.shape)}")
    differ = packed[2] != -packed[3]
    if bool(differ.any()):
        row = int(torch.nonzero(differ)[0, 0])
        raise ValueError(f"targets differ between processes (first at position "
                         f"{row_position(row, targets.shape)}): every process must pass the same targets")
    return torch.where(packed[1] > 0, float("nan"), packed[0])


def _shard_stats(local_logits, targets, z_t, ignore_index, n_local, backend):
    """Per row of this shard: #larger, #equal (the target included where it lies here), the
    shard's logsumexp (float64; -inf for a shard of padding only) and the first kept row with a
    non-finite logit (float64 0-d, -inf if none)."""
    n_rows = z_t.numel()
    device = z_t.device
    if n_local == 0:
        zeros = torch.zeros(n_rows, dtype=torch.int64, device=device)
        return zeros, zeros, torch.full_like(z_t, _NONE), torch.tensor(_NONE, dtype=torch.float64)
    targets = targets.to(torch.int64).contiguous()
    t_logit = z_t.to(torch.float64 if local_logits.dtype == torch.float64 else torch.float32)
    t_logit = t_logit.view(targets.shape)
    if backend == "torch":  # the reference materialises temporaries: a bounded chunk of rows at a time
        parts, first_bad = [], _NONE
        flat_targets, flat_logit = targets.reshape(-1), t_logit.reshape(-1)
        for a, rows in _row_chunks(local_logits, max(1, CHUNK_ELEMENTS // n_local)):
            b = a + rows.shape[0]
            g, e, lp, first = token_stats_op(rows, flat_targets[a:b], ignore_index, n_local, backend,
                                             flat_logit[a:b])
            parts.append((g, e, lp))
            if first_bad == _NONE and int(first) >= 0:
                first_bad = float(a + int(first))
        greater, equal, logp = (torch.cat([p[i] for p in parts]) for i in range(3))
        first_bad = torch.tensor(first_bad, dtype=torch.float64)
    else:
        greater, equal, logp, first = token_stats_op(local_logits, targets, ignore_index, n_local,
                                                     backend, t_logit)
        greater, equal, logp = greater.reshape(-1), equal.reshape(-1), logp.reshape(-1)
        first_bad = torch.where(first >= 0, first.to(torch.float64), _NONE)
    lse = z_t - logp.to(torch.float64)
    # Where the kernel's result is not finite, z_t - logp does not give back the shard's
    # logsumexp: compute it from the definition on those rows alone.
    redo = torch.nonzero((targets.reshape(-1) != ignore_index) & ~torch.isfinite(logp))[:, 0]
    if redo.numel():
        lead = torch.unravel_index(redo, tuple(targets.shape))
        rows = local_logits[lead][:, :n_local]
        acc = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
        lse[redo] = torch.logsumexp(rows.to(acc), dim=1).to(torch.float64)
    return greater, equal, lse, first_bad.to(device)


def _row_chunks(logits: torch.Tensor, rows_per_chunk: int):
    """(first flat row, [rows, V] view) pairs covering logits' rows in order, without copying
    (a strided [B, T-1, V] slice cannot be flattened into a view, but each [T-1, V] block can)."""
    try:
        blocks = [logits.view(-1, logits.shape[-1])]
    except RuntimeError:
        outer = logits.shape[:-2]
        blocks = (logits[idx] for idx in itertools.product(*(range(n) for n in outer)))
    first = 0
    for block in blocks:
        for a in range(0, block.shape[0], rows_per_chunk):
            yield first + a, block[a:a + rows_per_chunk]
        first += block.shape[0]


def _check_shards(table) -> int:
    """The shards [start, start + V_local) must tile [0, total) in some order; returns total."""
    for name, col in (("targets (number of tokens)", 3), ("vocab_size", 4),
                      ("the logits' dtype", 5), ("ignore_index", 6), ("check_finite", 7)):
        shown = ({v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()} if col == 5
                 else {1: "True", 0: "False"} if col == 7 else None)
        distributed.check_same(table, col, name + " differs between processes ({held}); every process "
                               "must pass the same", shown)
    shards = sorted((row[1], row[1] + row[2], r) for r, row in enumerate(table))
    end = 0
    for start, stop, r in shards:
        if start != end:
            what = "overlaps the shard before it" if start < end else f"leaves columns [{end}, {start}) uncovered"
            raise ValueError(f"vocab_start: the shards do not tile the vocabulary: process {r} holds "
                             f"[{start}, {stop}), which {what} (shards: "
                             f"{[(s, e) for s, e, _ in shards]})")
        end = stop
    return end
