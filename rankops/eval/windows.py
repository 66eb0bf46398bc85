"""The evaluation protocol: which documents, how they are tokenised and cut into windows.

The paper's protocol is the default: shuffle the documents with seed 42 and take the first
1000; tokenise each document alone with the model's tokenizer (no special tokens), prepending
the tokenizer's BOS token where it has one; cut it into windows of the model's context length
that overlap by one token (each starts at the previous one's last token). Every token but a
window's first is scored, given the window before it: the scored tokens are disjoint, and each
window's first prediction has one token of context. With a stride, windows of the context
length start every `stride` tokens instead and each scores only the tokens the previous window
did not (the first scores all): more context per prediction, more compute. Batches are right-padded; padded positions are ignored (label -100).

With a budget of scored tokens (max_tokens), windows are taken in order until it is spent, and
the window where it ends is cut after its last scored token: the tokens scored, and the context
each is predicted from, are those of the uncut window; the tokens after them are not computed.

`Protocol(lm_eval_windows=True)` reproduces lm-evaluation-harness's `loglikelihood_rolling`
windows instead (its HFLM defaults, `lm_eval.utils.get_rolling_token_windows` with
context_len=1 and `make_disjoint_window`), so that `rankops eval` and the `hf-rankops` adapter
(rankops.integrations.lm_eval) score the same tokens from the same inputs: each document is
tokenised as HFLM does (the tokenizer's own special tokens, none when the text starts with the
prefix token's text) and every one of its tokens is scored, the first conditioned on a prefix
token (BOS, else EOS). The first window reads the prefix and the first context_length - 1
tokens and scores context_length tokens; each later window scores the next context_length
tokens (the last scores what is left) from the context_length tokens just before each, so the
last window re-reads tokens the previous one scored. A window's input is context_length tokens
and its last scored token is a label only (Window.input_length).
"""
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class Protocol:
    n_documents: int = 1000          # after shuffling; None-like 0 would be an error
    seed: int = 42
    context_length: Optional[int] = None   # None: the model's
    stride: Optional[int] = None     # None: windows overlapping by one token, scoring disjoint tokens
    add_bos: bool = True             # prepend BOS to each document, if the tokenizer has one
    max_tokens: Optional[int] = None  # budget of scored tokens; None: everything selected
    batch_size: int = 8
    lm_eval_windows: bool = False    # lm-evaluation-harness's rolling windows (module docstring)

    def __post_init__(self):
        for name in ("n_documents", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        # A window of C tokens predicts C - 1 labels: a stride of C would leave one token per
        # window unscored.
        if self.stride is not None and not (1 <= self.stride < (self.context_length or self.stride + 1)):
            raise ValueError(f"stride must be in [1, context_length - 1], got {self.stride}"
                             + (f" with context_length {self.context_length}" if self.context_length else ""))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.lm_eval_windows and self.stride is not None:
            raise ValueError("stride does not apply to lm_eval_windows (lm-eval's rolling windows are disjoint)")
        if self.lm_eval_windows and not self.add_bos:
            raise ValueError("add_bos=False does not apply to lm_eval_windows: lm-eval always conditions a "
                             "document's first token on a prefix token (BOS, else EOS)")

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.lm_eval_windows:
            del d["lm_eval_windows"]  # default runs keep their results and resume identity unchanged
        return d


@dataclass(frozen=True)
class Window:
    tokens: tuple       # the input tokens (past input_length, labels only)
    first_scored: int   # labels (next tokens) are scored from this input position on
    n_scored: int       # how many labels are scored
    input_length: Optional[int] = None  # the model reads tokens[:input_length]; None: all of them


@dataclass
class Plan:
    windows: List[Window]
    n_documents: int            # selected
    n_documents_skipped: int    # shorter than two tokens
    n_scored_tokens: int

    def fingerprint(self) -> str:
        """Identifies the exact token stream, so a resumed run can check it is the same."""
        h = hashlib.sha256()
        for w in self.windows:
            fields = [w.first_scored, w.n_scored, list(w.tokens)]
            h.update(json.dumps(fields if w.input_length is None else fields + [w.input_length]).encode())
        return h.hexdigest()


def select_documents(documents: Sequence[str], n_documents: int, seed: int) -> List[str]:
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    return [documents[i] for i in order[:n_documents]]


def plan_windows(documents: Sequence[str], tokenizer, protocol: Protocol, context_length: int) -> Plan:
    selected = select_documents(documents, protocol.n_documents, protocol.seed)
    bos = tokenizer.bos_token_id if protocol.add_bos else None
    stride = protocol.stride or context_length
    if protocol.stride is not None and protocol.stride >= context_length:
        raise ValueError(f"stride must be shorter than the context length {context_length} (a window of "
                         f"C tokens predicts C - 1 labels; a stride of {protocol.stride} would leave tokens "
                         "unscored)")
    windows, skipped, budget = [], 0, protocol.max_tokens
    n_scored_total = 0
    for text in selected:
        if protocol.lm_eval_windows:
            doc_windows = lm_eval_rolling_windows(tokenizer, text, context_length)
            skipped += not doc_windows
            for w in doc_windows:
                if budget is not None and budget - n_scored_total < w.n_scored:
                    w = _cut(w, budget - n_scored_total)
                windows.append(w)
                n_scored_total += w.n_scored
                if budget is not None and n_scored_total >= budget:
                    return Plan(windows, len(selected), skipped, n_scored_total)
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None:
            ids = [bos] + ids
        if len(ids) < 2:
            skipped += 1
            continue
        start = 0
        while True:
            window = ids[start:start + context_length]
            # The first window scores all its labels; later ones only those past the previous
            # window's end (for disjoint windows that is all of them).
            first = 0 if start == 0 else max(0, context_length - stride - 1)
            n_scored = len(window) - 1 - first
            if budget is not None:
                n_scored = min(n_scored, budget - n_scored_total)
            if n_scored > 0:
                # Cut after the last scored token: where the budget ends inside a window, the
                # tokens past it would be computed for nothing (a whole window for 200 tokens).
                windows.append(Window(tuple(window[:first + n_scored + 1]), first, n_scored))
                n_scored_total += n_scored
            if budget is not None and n_scored_total >= budget:
                return Plan(windows, len(selected), skipped, n_scored_total)
            if start + context_length >= len(ids):
                break
            start += stride if protocol.stride else context_length - 1
    if not windows:
        raise ValueError(f"no document has two or more tokens ({skipped} of {len(selected)} "
                         "selected documents are shorter): nothing to score")
    return Plan(windows, len(selected), skipped, n_scored_total)


def _cut(w: Window, n_scored: int) -> Window:
    """w scoring only its first n_scored labels, without the tokens after the last of them. A
    causal model's logits at a position depend on the positions up to it only, so the tokens
    scored and the context each is predicted from are w's."""
    end = w.first_scored + n_scored  # the input positions read; tokens[end] is the last label
    return Window(w.tokens[:end + 1], w.first_scored, n_scored,
                  input_length=None if w.input_length is None else end)


def lm_eval_rolling_windows(tokenizer, text: str, context_length: int) -> List[Window]:
    """One document's windows as lm-eval's HFLM.loglikelihood_rolling builds them (with its
    defaults: add_bos_token and prefix_token_id unset): get_rolling_token_windows(context_len=1)
    then make_disjoint_window, each window's input cut to (context + continuation)[:-1]."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("lm_eval_windows need a tokenizer with a BOS or EOS token (lm-eval's prefix token)")
    # HFLM.tok_encode: the tokenizer's default special tokens, unless the text starts with the prefix.
    ids = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.decode(prefix)))["input_ids"]
    n, L = len(ids), context_length
    if n == 0:
        return []
    first = min(L, n)
    windows = [Window((prefix, *ids[:first]), 0, first, input_length=first)]
    predicted = first
    while predicted < n:
        n_scored = min(n - predicted, L)
        end = predicted + n_scored
        # lm-eval's input ids[end - L - 1:end - 1] scores ids[end - n_scored:end]; the last is a label only.
        windows.append(Window(tuple(ids[end - L - 1:end]), L - n_scored, n_scored, input_length=L))
        predicted = end
    return windows


def collate(windows: Sequence[Window], pad_id: int):
    """input_ids, attention_mask and labels [B, T] (labels already shifted: labels[:, i] is
    the token after input_ids[:, i]), right-padded; unscored positions hold -100."""
    width = max(w.input_length or len(w.tokens) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    for b, w in enumerate(windows):
        n = w.input_length or len(w.tokens)
        input_ids[b, :n] = torch.tensor(w.tokens[:n])
        attention_mask[b, :n] = 1
        labels[b, w.first_scored:w.first_scored + w.n_scored] = \
            torch.tensor(w.tokens[w.first_scored + 1:w.first_scored + 1 + w.n_scored])
    return input_ids, attention_mask, labels
