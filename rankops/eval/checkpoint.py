"""Checkpoints of `rankops eval` and the accumulator files it leaves: written whole, read back
only once verified.

A checkpoint is one dict, saved atomically (rankops.atomic):

    format         CHECKPOINT_FORMAT
    identity       everything that changes the numbers (rankops.eval.run.run_identity)
    accumulator    the RankAccumulator state (state_dict) after the first batches_done batches
    batches_done   this process's batches in it: the position, from the same instant
    timings        seconds spent so far
    digest         sha256 of all of the above, serialised canonically (state_digest)

read_checkpoint accepts a file only if it loads as plain tensors and containers
(torch.load(weights_only=True): no code runs), its identity equals the run's, its digest
matches, the state keeps the accumulator's invariants (check_accumulator_state), the position
lies within the run's plan, and the state holds exactly the tokens of the batches it claims.
The digest detects corruption (a flipped bit, a truncated or mixed file), not forgery: whoever
can write the file can recompute it. The invariants and the token count catch a state that no
sequence of batches could have produced, forged or not. Every refusal is a CheckpointError
whose message is one line naming the file and what is wrong with it.

The invariants have one owner, rankops.ops.accumulate.check_state, which
RankAccumulator.load_state_dict and the torchmetrics metric call too.
"""
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from rankops.accumulate import STATE_FORMAT
from rankops.atomic import save_atomic
from rankops.ops import accumulate as state_ops
from rankops.ops.accumulate import COUNT, N_ROWS, decompose_state

CHECKPOINT_FORMAT = 2
_KEYS = ("format", "identity", "accumulator", "batches_done", "timings", "digest")
_STATE_TENSORS = ("stats", "n_tied", "n_skipped")
_ADVICE = "; remove it or run without --resume"


class CheckpointError(ValueError):
    """A checkpoint or accumulator file that cannot be trusted; the message is one line."""


class Checkpoint(NamedTuple):
    accumulator: dict   # a verified RankAccumulator state (on the CPU)
    batches_done: int
    timings: dict


# -- the accumulator's state -----------------------------------------------------------------

def check_state_header(state, vocab_size: Optional[int] = None) -> int:
    """The state's keys, format, vocab_size and tensor types and shapes, without reading the
    tensors' values (so before anything is allocated for them); returns its vocab_size."""
    if not isinstance(state, dict):
        raise ValueError(f"the accumulator state is a {type(state).__name__}, not a dict")
    missing = [k for k in ("format", "vocab_size", "stats", "n_tied") if k not in state]
    if missing:
        raise ValueError(f"the accumulator state is missing {', '.join(missing)}")
    if state["format"] != STATE_FORMAT:
        raise ValueError(f"the accumulator state has format {state['format']!r}; this version reads {STATE_FORMAT}")
    v = state["vocab_size"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"the accumulator state's vocab_size is {v!r}, not a positive integer")
    if vocab_size is not None and v != vocab_size:
        raise ValueError(f"the accumulator state has vocab_size {v}, the model {vocab_size}")
    stats = state["stats"]
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 or tuple(stats.shape) != (N_ROWS, v):
        held = f"a {type(stats).__name__}" if not isinstance(stats, torch.Tensor) else \
            f"a {stats.dtype} tensor of shape {tuple(stats.shape)}"
        raise ValueError(f"the accumulator state claims vocab_size {v} but its stats are {held}, "
                         f"not an int64 tensor of shape ({N_ROWS}, {v})")
    for name in ("n_tied", "n_skipped"):
        x = state.get(name, torch.zeros((), dtype=torch.int64))
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.numel() != 1:
            raise ValueError(f"the accumulator state's {name} is not a one-element int64 tensor")
    if not isinstance(state.get("ties_known", True), bool):
        raise ValueError("the accumulator state's ties_known is not a bool")
    return v


def check_accumulator_state(state, vocab_size: Optional[int] = None) -> None:
    """Refuses (ValueError) a RankAccumulator state that no sequence of updates could have
    produced: the header (check_state_header), then the accumulator's invariants, from their
    owner (rankops.ops.accumulate.check_state)."""
    vocab_size = check_state_header(state, vocab_size)
    n_skipped = state.get("n_skipped", torch.zeros((), dtype=torch.int64))
    state_ops.check_state(state["stats"], torch.as_tensor(state["n_tied"]), torch.as_tensor(n_skipped),
                          vocab_size, ties_known=state.get("ties_known", True), where="the accumulator state")


# -- the digest ------------------------------------------------------------------------------

def state_digest(identity, accumulator: dict, batches_done: int, timings: dict) -> str:
    """sha256 over a canonical serialisation: the plain fields as sorted JSON, then each state
    tensor's dtype, shape and little-endian bytes. Needs the state's header checked first."""
    h = hashlib.sha256()
    plain = {"format": CHECKPOINT_FORMAT, "identity": identity, "batches_done": batches_done, "timings": timings,
             "accumulator": {k: v for k, v in accumulator.items() if k not in _STATE_TENSORS}}
    h.update(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode())
    for name in _STATE_TENSORS:
        x = accumulator.get(name, torch.zeros((), dtype=torch.int64)).detach().cpu().contiguous()
        h.update(f"\0{name}:{x.dtype}:{tuple(x.shape)}\0".encode())
        h.update(x.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


# -- checkpoint files ------------------------------------------------------------------------

def write_checkpoint(path: Path, identity: dict, accumulator: dict, batches_done: int, timings: dict) -> None:
    """Saves a checkpoint atomically; accumulator is a state_dict() (moved to the CPU here)."""
    accumulator = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in accumulator.items()}
    save_atomic(path, {"format": CHECKPOINT_FORMAT, "identity": identity, "accumulator": accumulator,
                       "batches_done": batches_done, "timings": timings,
                       "digest": state_digest(identity, accumulator, batches_done, timings)})


def _load(path: Path, what: str, advice: str = ""):
    """torch.load(weights_only=True) on the CPU, every failure as one line (advice appended)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not {what}{advice}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. weights_only's note on a foreign pickle protocol
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, or refused by weights_only
        raise CheckpointError(f"{path}: cannot be read as {what} (truncated, empty or not written by "
                              f"rankops?): {_load_failure(exc)[:300]}{advice}") from None


_BOILERPLATE = ("Weights only load failed", "In PyTorch 2.6", "(1)", "(2)", "Please file an issue",
                "Check the documentation")


def _load_failure(exc: Exception) -> str:
    """torch.load's failure in one line; weights_only's refusal spreads its reason over many."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Weights only load failed"):
        return f"{type(exc).__name__}: {lines[0] if lines else 'the file ends early'}"
    reasons = [line for line in lines if not line.startswith(_BOILERPLATE)]
    reason = reasons[0].replace("WeightsUnpickler error:", "").strip() if reasons else "unknown"
    return f"it holds more than tensors and plain containers, which is refused unread ({reason})"


def describe_difference(saved, expected, prefix: str = "") -> list:
    """The fields in which two identities differ, as 'field: X there, Y now'."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(saved) | set(expected), key=str):
            if saved.get(k) != expected.get(k):
                out += describe_difference(saved.get(k), expected.get(k), f"{prefix}{k}.")
        return out
    return [f"{prefix.rstrip('.')}: {saved!r} there, {expected!r} now"]


def read_checkpoint(path: Path, identity: dict, n_batches: int, tokens_after) -> Checkpoint:
    """The checkpoint at path, verified for this run (see the module docstring); n_batches: this
    process's batches in the run; tokens_after(k): the tokens its first k batches score."""
    saved = _load(path, "a checkpoint", _ADVICE)

    def refuse(what: str):
        return CheckpointError(f"{path}: {what}{_ADVICE}")
    if not isinstance(saved, dict):
        raise refuse(f"holds a {type(saved).__name__}, not a checkpoint")
    if "identity" not in saved:
        raise refuse("is not a rankops eval checkpoint (it has no identity)")
    if saved["identity"] != identity:
        diff = describe_difference(saved["identity"], identity)
        raise refuse("was written by a different run (" + "; ".join(diff[:4])
                     + (f"; {len(diff) - 4} more" if len(diff) > 4 else "") + ")")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise refuse(f"has format {saved.get('format')!r} (this version reads {CHECKPOINT_FORMAT}: "
                     "checkpoints without a digest cannot be verified)")
    missing = [k for k in _KEYS if k not in saved]
    if missing:
        raise refuse(f"is missing {', '.join(missing)}")
    done, timings, accumulator = saved["batches_done"], saved["timings"], saved["accumulator"]
    if isinstance(done, bool) or not isinstance(done, int):
        raise refuse(f"its position (batches done) is {done!r}, not an integer")
    if not (isinstance(timings, dict) and all(isinstance(v, float) and v >= 0 for v in timings.values())):
        raise refuse("its timings are not a dict of non-negative seconds")
    try:
        check_state_header(accumulator)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if saved["digest"] != state_digest(saved["identity"], accumulator, done, timings):
        raise refuse("its digest does not match its contents (the file is corrupt)")
    if not 0 <= done <= n_batches:
        raise refuse(f"its position, {done} batches done, lies outside this run's {n_batches} batches")
    try:
        check_accumulator_state(accumulator, identity.get("vocab_size"))
    except ValueError as exc:
        raise refuse(str(exc)) from None
    n_tokens, want = int(accumulator["stats"][COUNT].sum()), tokens_after(done)
    if n_tokens != want:
        raise refuse(f"its statistics hold {n_tokens} tokens but its first {done} batches score {want}")
    return Checkpoint(accumulator, done, timings)


# -- accumulator files (accumulator.pt beside results.json) ----------------------------------

def read_accumulator_decomposition(path: Path, ties: str = "strict"):
    """The decomposition of the accumulator state saved at path, checked before anything is
    allocated for it: the sizes it claims must be those of the tensors it holds (so a small file
    cannot ask for a huge vocabulary), then the invariants. No accumulator is allocated: the
    state's own tensors are decomposed, and the work goes by the ranks observed."""
    state = _load(Path(path), "an accumulator file")
    try:
        check_accumulator_state(state)
        return decompose_state(state["stats"], state.get("n_skipped", torch.zeros((), dtype=torch.int64)), ties)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
