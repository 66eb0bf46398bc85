"""Distributed accumulation and vocabulary-parallel logits, on torch.distributed.

Two ways a corpus is spread over processes:

- Data parallel: each process accumulates its own tokens; RankAccumulator.all_reduce() sums
  the int64 state with one all-reduce (the state is as long as the vocabulary, so never an
  all-gather). Integer sums are exact: the reduced state equals a single process's, bit for bit.
- Vocabulary (tensor) parallel: every process holds columns [vocab_start, vocab_start + V_local)
  of every row. token_stats_vocab_parallel() exchanges O(N) values per process: the target
  logit and row maximum by MAX, the counts of larger and equal logits and the shard's sum of
  exp by SUM, so rank and ties are exact and logp differs from the unsharded one only by
  fp32 rounding.

Every check that could fail on one process only is agreed on through a collective before anyone
raises, so a bad argument raises on every process instead of leaving the others waiting.
Collectives run on CPU tensors under gloo and on the current CUDA device under nccl.
"""
import datetime
import itertools
import os
from typing import Optional

import torch

from rankops.ops.token_stats import TokenStats, check_inputs, check_sync_options, row_position

# Rows of logits processed at once: at most this many elements per temporary, whatever N.
CHUNK_ELEMENTS = 1 << 22
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}
_EVAL_GROUP_OWNED = False  # init_eval_process_group created the default group


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group() first (torchrun sets the "
                           "environment for init_method='env://')")
    return dist


def comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensors must live: CPU for gloo, the current GPU for nccl."""
    backend = str(_dist().get_backend(group)).lower()
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # multi-backend groups ("cpu:gloo,cuda:nccl") dispatch on the device


def all_reduce_tensor(x: torch.Tensor, op: str, group, device: torch.device) -> torch.Tensor:
    """x all-reduced with op ("sum" or "max") on the group's device, returned on device."""
    dist = _dist()
    buf = x.to(comm_device(group, device))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return buf.to(device)


def all_reduce_accumulator(acc, group=None):
    """Sums acc's state over the group's processes in place (RankAccumulator.all_reduce)."""
    device = acc.device
    # One MAX over (V, -V, -ties_known) finds differing vocabularies and unknown ties cheaply,
    # before the big collective: every process sees the same answer and raises alike.
    meta = torch.tensor([acc.vocab_size, -acc.vocab_size, -int(acc.ties_known)], dtype=torch.int64)
    v_max, neg_v_min, neg_ties_known = all_reduce_tensor(meta, "max", group, device).tolist()
    if v_max != -neg_v_min:
        raise ValueError(f"vocab_size differs between processes (from {-neg_v_min} to {v_max}): "
                         "every process must accumulate the same vocabulary")
    # The whole state in one SUM: stats [6, V] and the two scalar counters behind it. Every lo
    # word is in [0, 2^32) before the sum, so the int64 sum cannot overflow below 2^31 processes.
    flat = torch.cat([acc.stats.reshape(-1), acc.n_tied.reshape(1), acc.n_skipped.reshape(1)])
    total = all_reduce_tensor(flat, "sum", group, device)
    n = acc.stats.numel()
    acc.stats = total[:n].view_as(acc.stats).clone()
    acc.n_tied = total[n].clone()
    acc.n_skipped = total[n + 1].clone()
    acc.ties_known = -neg_ties_known == 1
    from rankops.accumulate import normalize_carry
    normalize_carry(acc.stats)
    return acc


def token_stats_vocab_parallel(local_logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int,
                               vocab_size: Optional[int] = None, group=None, ignore_index: int = -100,
                               check_finite: bool = True) -> TokenStats:
    """rankops.token_stats on logits whose vocabulary is split over the group's processes.

    Each process passes its own columns [vocab_start, vocab_start + V_local) of every row (as
    tensor-parallel output layers produce them) and the same targets (global vocabulary
    indices). Every process gets the TokenStats of the concatenated logits: rank and ties
    exactly, logp within a few fp32 ulp of the unsharded value (the sums of exp add in another
    order). Only O(N) values per process are exchanged (four all-reduces), and the local work
    holds no [N, V_local] temporary beyond a bounded chunk of rows.

    Args:
        local_logits: [..., V_local], float32, bfloat16, float16 or float64.
        targets: integer tensor of the leading shape, identical on every process.
        vocab_start: the global index of this process's first column. The shards must tile
            [0, sum of V_local) without gaps or overlaps (checked).
        vocab_size: the global number of real columns; columns at or past it are padding and
            never count (default: all columns).
        group: the process group holding the shards (default: the world).
        ignore_index, check_finite: as in rankops.token_stats.

    Example (2 processes, vocabulary 50304 split in halves):
        >>> s = rankops.token_stats_vocab_parallel(logits[..., 25152 * rank:25152 * (rank + 1)],
        ...                                        targets, vocab_start=25152 * rank, vocab_size=50277)
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local_error = None
    try:
        check_sync_options(check_finite, True)
        check_inputs(local_logits, targets, ignore_index, None, validate=False)
        if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
            raise TypeError(f"vocab_start must be an int, got {vocab_start!r}")
        if vocab_start < 0:
            raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
    except (TypeError, ValueError) as exc:
        local_error = exc
    device = local_logits.device if isinstance(local_logits, torch.Tensor) else torch.device("cpu")

    # 1. Every process's shard and arguments, one row each (SUM of a [world, 7] table of zeros
    # and own rows: O(world) values). Everyone then checks the same table and agrees.
    table = torch.zeros(world, 7, dtype=torch.int64)
    if local_error is None:
        table[rank] = torch.tensor([1, vocab_start, local_logits.shape[-1], targets.numel(),
                                    -1 if vocab_size is None else vocab_size,
                                    _DTYPE_CODES[local_logits.dtype], ignore_index])
    table = all_reduce_tensor(table, "sum", group, device).tolist()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if table[r][0] == 0]
    if failed:
        raise ValueError(f"process(es) {failed} of the group rejected their arguments to "
                         "token_stats_vocab_parallel (see their error); nothing was computed")
    n_total = _check_shards(table, world)
    n_cols = n_total if vocab_size is None else vocab_size
    if not 1 <= n_cols <= n_total:
        raise ValueError(f"vocab_size must be in [1, {n_total}] (the shards' total columns), got {vocab_size}")
    n_local_cols = max(0, min(n_cols - vocab_start, local_logits.shape[-1]))  # real columns held here

    t = targets.reshape(-1).to(torch.int64)
    n_rows = t.numel()
    keep = t != ignore_index
    in_range = (t >= 0) & (t < n_cols)
    valid = keep & in_range
    compute_dtype = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(n_local_cols, 1))

    # 2. Pass one: the target logit where this process owns the target's column, the shard's
    # row maximum and the non-finite rows. One MAX all-reduce of [6, N] float64 and a scalar:
    # target logit (-inf where not owned), target logit is NaN, row max (NaN left out), row
    # flags (1: a NaN, 2: a non-finite value in a kept row when check_finite), target and
    # -target (equal on every process iff the targets agree); then -(first bad target row).
    # NaN travels as flags because MAX does not propagate it reliably.
    none = float("-inf")
    packed = torch.full((6, n_rows), none, dtype=torch.float64, device=device)
    for a, rows in _row_chunks(local_logits, rows_per_chunk):
        z, b = rows[:, :n_local_cols], a + rows.shape[0]            # [b - a, n_local_cols]
        col = t[a:b] - vocab_start
        owned = valid[a:b] & (col >= 0) & (col < n_local_cols)
        z_t = z.gather(1, torch.where(owned, col, 0)[:, None])[:, 0].to(torch.float64) if n_local_cols \
            else torch.zeros(b - a, dtype=torch.float64, device=device)
        packed[0, a:b] = torch.where(owned & ~z_t.isnan(), z_t, none)
        packed[1, a:b] = (owned & z_t.isnan()).to(torch.float64)
        if n_local_cols:
            # amax propagates NaN: a row with a NaN has a NaN logsumexp whatever its maximum.
            row_max = z.amax(dim=1).to(torch.float64)
            packed[2, a:b] = torch.where(row_max.isnan(), none, row_max)
            packed[3, a:b] = row_max.isnan().to(torch.float64)
            if check_finite:
                nonfinite = ~row_max.isfinite() | ~z.amin(dim=1).isfinite()
                packed[3, a:b] += 2 * (nonfinite & keep[a:b]).to(torch.float64)
        else:
            packed[3, a:b] = 0.0
    kept_t = torch.where(valid, t, -1).to(torch.float64)
    packed[4], packed[5] = kept_t, -kept_t
    bad_target = torch.nonzero(keep & ~in_range)
    scalars = torch.tensor([-float(bad_target[0, 0]) if bad_target.numel() else none],
                           dtype=torch.float64, device=device)
    reduced = all_reduce_tensor(torch.cat([packed.reshape(-1), scalars]), "max", group, device)
    packed, first_bad_target = reduced[:-1].view(6, n_rows), reduced[-1].item()
    if first_bad_target != none:
        row = int(-first_bad_target)
        raise ValueError(f"targets must lie in [0, {n_cols}) or equal ignore_index={ignore_index}; "
                         f"found {int(t[row])} at position {row_position(row, targets.shape)}")
    differ = packed[4] != -packed[5]
    if bool(differ.any()):
        row = int(torch.nonzero(differ)[0, 0])
        raise ValueError(f"targets differ between processes (first at position "
                         f"{row_position(row, targets.shape)}): every process must pass the same targets")
    if check_finite:
        bad = torch.nonzero(packed[3] >= 2)
        if bad.numel():
            row = int(bad[0, 0])
            raise ValueError(f"logits contain a non-finite value (NaN or +-inf) in the row at position "
                             f"{row_position(row, targets.shape)} (on some process); pass "
                             "check_finite=False to compute with IEEE semantics anyway")
    z_t = torch.where(packed[1] > 0, float("nan"), packed[0])     # [N] float64, exact
    row_max = packed[2]
    # As torch.logsumexp: an infinite maximum is not subtracted (inf - inf would be NaN).
    shift = torch.where(row_max.isinf(), 0.0, row_max)

    # 3. Pass two: larger and equal logits, compared in the logits' own dtype (z_t came from
    # that dtype, so casting it back is exact), and the shard's sum of exp(z - max) in fp32
    # (float64 for float64 logits). One SUM all-reduce of [3, N] float64: counts stay exact
    # below 2^53.
    sums = torch.zeros(3, n_rows, dtype=torch.float64, device=device)
    if n_local_cols:
        for a, rows in _row_chunks(local_logits, rows_per_chunk):
            z, b = rows[:, :n_local_cols], a + rows.shape[0]
            z_t_native = z_t[a:b].to(local_logits.dtype)[:, None]
            sums[0, a:b] = (z > z_t_native).sum(dim=1).to(torch.float64)
            sums[1, a:b] = (z == z_t_native).sum(dim=1).to(torch.float64)
            e = z.to(compute_dtype) - shift[a:b].to(compute_dtype)[:, None]  # a new tensor
            sums[2, a:b] = e.exp_().sum(dim=1).to(torch.float64)
    sums = all_reduce_tensor(sums, "sum", group, device)

    greater, equal = sums[0].to(torch.int64), sums[1].to(torch.int64)
    ties = equal - (z_t == z_t).to(torch.int64)  # the target is not its own tie
    logp = (z_t - shift) - sums[2].log()
    logp = torch.where(packed[3] > 0, float("nan"), logp)  # a NaN in the row (check_finite=False)
    rank = torch.where(keep, greater, -1).view(targets.shape)
    ties = torch.where(keep, ties, 0).view(targets.shape)
    logp = torch.where(keep, logp, 0.0).to(compute_dtype).view(targets.shape)
    return TokenStats(rank, ties, logp)


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


def _check_shards(table, world) -> int:
    """The shards [start, start + V_local) must tile [0, total) in some order; returns total."""
    for name, col in (("targets (number of tokens)", 3), ("vocab_size", 4),
                      ("the logits' dtype", 5), ("ignore_index", 6)):
        values = sorted({row[col] for row in table})
        if len(values) > 1:
            raise ValueError(f"{name} differs between processes ({values}); every process must "
                             "pass the same")
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


def init_eval_process_group(device: str):
    """For `rankops eval` under torchrun: with WORLD_SIZE > 1 in the environment, initialises
    the default process group (nccl for a CUDA device, gloo otherwise) unless it already is,
    and puts each process on its own GPU (cuda:LOCAL_RANK). Returns (device, rank, world_size)."""
    global _EVAL_GROUP_OWNED
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    import torch.distributed as dist
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        _EVAL_GROUP_OWNED = True
    return device, dist.get_rank(), dist.get_world_size()


def destroy_eval_process_group() -> None:
    """Destroys the process group init_eval_process_group created (if it did)."""
    global _EVAL_GROUP_OWNED
    if _EVAL_GROUP_OWNED:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _EVAL_GROUP_OWNED = False


def all_reduce_timings(timings: dict, group=None) -> dict:
    """Process-seconds summed (forward_s, metric_s) and the longest wall_s, over the group."""
    total = all_reduce_tensor(torch.tensor([timings["forward_s"], timings["metric_s"]], dtype=torch.float64),
                              "sum", group, torch.device("cpu")).tolist()
    wall = all_reduce_tensor(torch.tensor([timings.get("wall_s", 0.0)], dtype=torch.float64),
                              "max", group, torch.device("cpu")).item()
    return dict(timings, forward_s=total[0], metric_s=total[1], wall_s=wall)
