"""accumulate: per-rank sufficient statistics, added straight from the logits. The owner of the
accumulator's state layout (docs/DESIGN.md, "The accumulator's state").

The state is one int64 tensor `stats` [6, V] and two int64 counters (n_tied, n_skipped):

    row 0 COUNT        tokens of strict rank k
    row 1 SUM_HI       sum of their logp, fixed point, high word
    row 2 SUM_LO       ... low word, in [0, 2^32) between calls
    rows 3-5           the same by pessimistic rank (rank + ties)

Each token's logp is quantised to q = floor(logp * 2^40 + 1/2) (exact for float32 values of
magnitude >= 2^-16, within 2^-41 otherwise) and added as hi = q >> 32 and lo = q mod 2^32, with
lo's carry moved into hi. Integer addition is associative, so batches, shards, threads, GPUs
and processes merge bit-identically in any order; float64 appears only in the decomposition.
|logp| must stay below 2^23 so that q fits an int64. C++ and CUDA read the same layout from
csrc/common/state_layout.h; the Triton kernels receive it from here (StateLayout.kernel_constants).

Read top-down: the functional core (new_state, add_tokens, merge_state, decompose_state), the
public accumulate(), the torch.library op, the per-backend launch. RankAccumulator
(rankops/accumulate.py) and the torchmetrics metric are thin holders of this state.
"""
from typing import NamedTuple, Optional

import torch

from rankops import _ext
from rankops.decompose import TIE_MODES, Decomposition, decompose_counts
from rankops.ops import token_stats as token_stats_module
from rankops.ops.common import nonfinite_error, prepare, row_position


class StateLayout(NamedTuple):
    count: int = 0
    sum_hi: int = 1
    sum_lo: int = 2
    count_pess: int = 3
    sum_hi_pess: int = 4
    sum_lo_pess: int = 5
    n_rows: int = 6
    logp_scale: float = 2.0 ** 40
    logp_limit: float = 2.0 ** 23

    def kernel_constants(self) -> dict:
        """The layout as the Triton kernels take it (as compile-time constants)."""
        return dict(rows=(self.count, self.sum_hi, self.sum_lo, self.count_pess, self.sum_hi_pess,
                          self.sum_lo_pess), logp_scale=self.logp_scale, logp_limit=self.logp_limit)


LAYOUT = StateLayout()
COUNT, SUM_HI, SUM_LO, COUNT_PESS, SUM_HI_PESS, SUM_LO_PESS = LAYOUT[:6]
N_ROWS, LOGP_SCALE, LOGP_LIMIT = LAYOUT.n_rows, LAYOUT.logp_scale, LAYOUT.logp_limit
LOW_MASK = (1 << 32) - 1


# -- the functional core -------------------------------------------------------------------

def new_state(vocab_size: int, device=None):
    """(stats [6, vocab_size], n_tied, n_skipped), all zero, int64."""
    device = torch.device("cpu" if device is None else device)
    return (torch.zeros(N_ROWS, vocab_size, dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros((), dtype=torch.int64, device=device))


def quantize_logp(logp: torch.Tensor) -> torch.Tensor:
    """float logp -> int64 fixed point with 40 fractional bits (round half up)."""
    return torch.floor(logp.to(torch.float64) * LOGP_SCALE + 0.5).to(torch.int64)


def fixed_to_float(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The float64 value of hi * 2^32 + lo, in units of 2^-40."""
    return hi.to(torch.float64) * (2.0 ** 32 / LOGP_SCALE) + lo.to(torch.float64) / LOGP_SCALE


def normalize_carry(stats: torch.Tensor) -> None:
    """Moves each lo word's carry into its hi word, in place, leaving lo in [0, 2^32)."""
    for hi, lo in ((SUM_HI, SUM_LO), (SUM_HI_PESS, SUM_LO_PESS)):
        carry = stats[lo] >> 32
        stats[hi] += carry
        stats[lo] -= carry << 32


def accumulable(logp: torch.Tensor) -> torch.Tensor:
    """Where logp can be added to the state: finite and |logp| < 2^23 (False for NaN)."""
    return logp.abs() < LOGP_LIMIT


def add_tokens(stats: torch.Tensor, rank: torch.Tensor, logp: torch.Tensor,
               ties: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adds tokens (flat, all kept, logp accumulable) into stats in place; returns how many had
    ties, as a 0-d tensor (no sync). Without ties the pessimistic rows are left alone."""
    q = quantize_logp(logp)
    hi, lo = q >> 32, q & LOW_MASK
    ones = torch.ones_like(rank)
    for row, value in ((COUNT, ones), (SUM_HI, hi), (SUM_LO, lo)):
        stats[row].index_add_(0, rank, value)
    if ties is None:
        normalize_carry(stats)
        return torch.zeros((), dtype=torch.int64, device=stats.device)
    pess = rank + ties
    for row, value in ((COUNT_PESS, ones), (SUM_HI_PESS, hi), (SUM_LO_PESS, lo)):
        stats[row].index_add_(0, pess, value)
    normalize_carry(stats)
    return (ties > 0).sum()


def merge_state(stats, n_tied, n_skipped, other_stats, other_n_tied, other_n_skipped) -> None:
    """Adds another state into (stats, n_tied, n_skipped), in place."""
    stats += other_stats.to(stats.device)
    n_tied += other_n_tied.to(n_tied.device)
    n_skipped += other_n_skipped.to(n_skipped.device)
    normalize_carry(stats)


def decompose_state(stats: torch.Tensor, n_skipped: torch.Tensor, ties: str = "strict") -> Decomposition:
    """The decomposition of a state: by strict rank, or by rank + ties ("pessimistic").
    Refuses while tokens were left out (n_skipped > 0): the result would not cover them."""
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    skipped = int(n_skipped)
    if skipped:
        raise ValueError(f"{skipped} token(s) were left out by update(validate=False) because "
                         "their logp was non-finite; the decomposition would not cover them")
    if ties == "pessimistic":
        return decompose_counts(stats[COUNT_PESS], fixed_to_float(stats[SUM_HI_PESS], stats[SUM_LO_PESS]),
                                ties=ties)
    return decompose_counts(stats[COUNT], fixed_to_float(stats[SUM_HI], stats[SUM_LO]), ties=ties)


def all_reduce_state(stats, n_tied, n_skipped, group, ties_known: bool = True):
    """The state summed over a torch.distributed group with one int64 all-reduce of the packed
    state (never an all-gather); returns new (stats, n_tied, n_skipped) on stats' device and
    whether ties are known on every process. Each process's vocab_size (and ties_known) first
    go through a small [world, 2] table (distributed.exchange_rows), so a mismatch raises on
    every process, naming each one's, instead of breaking the collective. Every lo word is in
    [0, 2^32) before the sum, so the int64 sum cannot overflow below 2^31 processes."""
    from rankops.distributed import all_reduce_tensor, check_same, exchange_rows
    table = exchange_rows([stats.shape[1], int(ties_known)], 2, group, stats.device)
    check_same(table, 0, "vocab_size differs between processes ({held}): every process must "
                         "accumulate the same vocabulary")
    flat = torch.cat([stats.reshape(-1), n_tied.reshape(1), n_skipped.reshape(1)])
    total = all_reduce_tensor(flat, "sum", group, stats.device)
    n = stats.numel()
    out = total[:n].view_as(stats).clone()
    normalize_carry(out)
    return out, total[n].clone(), total[n + 1].clone(), all(known for _, known in table)


def check_state_tensors(stats, n_tied, n_skipped, vocab_size: int, where: str = "state") -> None:
    """The state's tensors have the layout's dtype and shape."""
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 \
            or tuple(stats.shape) != (N_ROWS, vocab_size):
        raise ValueError(f"{where}['stats'] must be an int64 tensor of shape ({N_ROWS}, {vocab_size})")
    for name, x in (("n_tied", n_tied), ("n_skipped", n_skipped)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.numel() != 1:
            raise ValueError(f"{where}[{name!r}] must be an int64 tensor holding one number")


def check_state(stats, n_tied, n_skipped, vocab_size: int, *, ties_known: bool = True,
                where: str = "state") -> None:
    """Raises ValueError unless the state is one that some sequence of updates could have
    produced. By strict and by pessimistic rank: counts >= 0, totalling below 2^62; lo words in
    [0, 2^32); every bin's logp sum <= 0 (each logp is), none where the bin has no token, and
    no lower than -2^23 per token. As many tokens by pessimistic rank as by strict rank (at most
    as many once ties were unknown), and never more of pessimistic rank <= k than of strict
    rank <= k (rank + ties >= rank); 0 <= n_tied <= n_tokens, and n_tied at least the tokens
    the ties moved past any k; n_skipped >= 0. The one owner of these invariants: RankAccumulator,
    the torchmetrics metric and the evaluation's checkpoints all call it."""
    check_state_tensors(stats, n_tied, n_skipped, vocab_size, where)
    s = stats.detach().to("cpu")
    counts = {}
    for count_row, hi_row, lo_row, label in ((COUNT, SUM_HI, SUM_LO, "strict"),
                                             (COUNT_PESS, SUM_HI_PESS, SUM_LO_PESS, "pessimistic")):
        count, hi, lo = s[count_row], s[hi_row], s[lo_row]
        if bool((count < 0).any()):
            raise ValueError(f"{where} has a negative {label} count")
        # A total below 2^62 keeps every sum and cumulative sum exact in int64.
        if float(count.double().sum()) >= 2.0 ** 62:
            raise ValueError(f"{where} has {label} counts adding up to 2^62 tokens or more")
        if bool(((lo < 0) | (lo > LOW_MASK)).any()):
            raise ValueError(f"{where} has a {label} low word outside [0, 2^32)")
        if bool(((hi > 0) | ((hi == 0) & (lo > 0))).any()):
            raise ValueError(f"{where} has a positive {label} logp sum (every logp is <= 0)")
        if bool(((count == 0) & ((hi != 0) | (lo != 0))).any()):
            raise ValueError(f"{where} has a {label} logp sum at a rank without tokens")
        # Each token adds q >= -2^63 in units of 2^-40, so n tokens keep hi >= -n * 2^31.
        if bool((hi < -(count.clamp(max=LOW_MASK) << 31)).any()):
            raise ValueError(f"{where} has a {label} logp sum below -2^23 per token")
        counts[label] = count
    strict, pess = counts["strict"], counts["pessimistic"]
    n_strict, n_pess = int(strict.sum()), int(pess.sum())
    if n_pess > n_strict or (ties_known and n_pess != n_strict):
        raise ValueError(f"{where} holds {n_strict} tokens by strict rank but {n_pess} by "
                         "pessimistic rank")
    # Tokens of strict rank <= k minus those of pessimistic rank <= k: the tokens whose ties moved
    # them past k. Never negative; each such token has a tie, so n_tied is at least the largest.
    moved_past = strict.cumsum(0) - pess.cumsum(0)
    if bool((moved_past < 0).any()):
        raise ValueError(f"{where} has more tokens of pessimistic rank <= k than of strict rank <= k "
                         "for some k (rank + ties is never below rank)")
    if not 0 <= int(n_tied) <= n_strict:
        raise ValueError(f"{where} has n_tied = {int(n_tied)}, outside [0, n_tokens = {n_strict}]")
    if ties_known and int(n_tied) < int(moved_past.max()):
        raise ValueError(f"{where} has n_tied = {int(n_tied)}, but at least {int(moved_past.max())} "
                         "tokens have ties")
    if int(n_skipped) < 0:
        raise ValueError(f"{where} has n_skipped = {int(n_skipped)}, below 0")


def bad_logp_error(row: int, shape) -> ValueError:
    pos = row_position(row, shape)
    return ValueError(f"logp of the token at position {pos} is non-finite or beyond -2^23 and "
                      f"cannot be accumulated (non-finite logits with check_finite=False?)")


# -- the op ----------------------------------------------------------------------------------

def accumulate(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
               n_tied: torch.Tensor, n_skipped: torch.Tensor, *, ignore_index: int = -100,
               backend: str = "auto", check_finite: bool = True, validate: bool = True) -> None:
    """Adds a batch into a state (stats [6, V], n_tied, n_skipped), in place, counting the
    first V columns of the logits. A call that raises adds nothing. With validate=False (and
    check_finite=False) nothing syncs; a kept token whose logp cannot be accumulated is left
    out and counted in n_skipped instead of raising."""
    if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] < stats.shape[1]:
        raise ValueError(f"logits have {logits.shape[-1]} columns but the accumulator counts "
                         f"vocab_size={stats.shape[1]} ranks")
    targets, opt = prepare(logits, targets, ignore_index=ignore_index, vocab_size=stats.shape[1],
                           backend=backend, check_finite=check_finite, validate=validate)
    if stats.device != logits.device:
        raise ValueError(f"logits is on {logits.device} but the accumulator's state is on {stats.device}")
    accumulate_op(logits, targets, opt.ignore_index, opt.n_cols, opt.backend, check_finite, validate,
                  stats, n_tied, n_skipped)


@torch.library.custom_op("rankops::accumulate_", mutates_args=("stats", "n_tied", "n_skipped"))
def accumulate_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_cols: int,
                  backend: str, check_finite: bool, validate: bool, stats: torch.Tensor,
                  n_tied: torch.Tensor, n_skipped: torch.Tensor) -> None:
    """Adds the batch into the state in place, with every backend's failure semantics the same:
    with validate, a non-finite kept row (when check_finite) or an unaccumulable logp raises
    and nothing is added; without, such tokens are left out and counted in n_skipped."""
    launch(logits, targets, ignore_index, n_cols, backend, check_finite, validate, stats, n_tied,
           n_skipped)


@accumulate_op.register_fake
def _(logits, targets, ignore_index, n_cols, backend, check_finite, validate, stats, n_tied, n_skipped):
    return None


def launch(logits, targets, ignore_index, n_cols, backend, check_finite, validate, stats, n_tied,
           n_skipped) -> None:
    if backend == "cpu":
        # The C++ kernel adds all or nothing (validate), or leaves out and counts (not validate).
        nonfinite_row, bad_logp_row, tied, skipped = _ext.cpu_accumulate(
            logits, targets, stats, ignore_index, n_cols, check_finite, not validate)
        if validate and check_finite and nonfinite_row >= 0:
            raise nonfinite_error(nonfinite_row, targets.shape)
        if validate and bad_logp_row >= 0:
            raise bad_logp_error(bad_logp_row, targets.shape)
        n_tied += tied
        n_skipped += skipped
        return
    if backend != "torch" and not validate:
        # Sync-free: the GPU kernels add every kept token with an accumulable logp as they go.
        rank, ties, logp, _ = token_stats_module.launch(logits, targets, ignore_index, n_cols, backend,
                                                        stats=stats, layout=LAYOUT)
        kept = rank.reshape(-1) >= 0
        added = kept & accumulable(logp.reshape(-1))
        n_tied += (added & (ties.reshape(-1) > 0)).sum()
        n_skipped += (kept & ~added).sum()
        normalize_carry(stats)
        return
    # Per-token results first, then the checks, then the add: a raise adds nothing.
    rank, ties, logp, first_bad = token_stats_module.launch(logits, targets, ignore_index, n_cols,
                                                            backend)
    rank, ties, logp = rank.reshape(-1), ties.reshape(-1), logp.reshape(-1)
    kept = rank >= 0
    ok = kept & accumulable(logp)
    if validate:
        if check_finite and int(first_bad) >= 0:  # the one sync
            raise nonfinite_error(int(first_bad), targets.shape)
        bad = torch.nonzero(kept & ~ok)
        if bad.numel():
            raise bad_logp_error(int(bad[0, 0]), targets.shape)
    else:
        n_skipped += (kept & ~ok).sum()
    n_tied += add_tokens(stats, rank[ok], logp[ok], ties[ok])
