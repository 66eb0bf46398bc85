"""lm-evaluation-harness model `hf-rankops`: lm-eval's HF model, plus the decomposition of
cross-entropy on every rolling log-likelihood task (wikitext-style perplexity tasks).

Importing this module registers the model with lm-eval. On `loglikelihood_rolling` requests it
feeds the raw logits of every scored token, from the forward pass lm-eval already runs, into a
`rankops.RankAccumulator` per task (fused kernel, vocabulary cut to the tokenizer's real size);
every other request type runs exactly as lm-eval's `hf` model. After the run:

- `lm.decompositions` ({task: Decomposition}), `lm.decomposition` (all tasks together) and
  `lm.accumulators` on an instance;
- `results["config"]["rankops"]` in the results of `lm_eval.simple_evaluate(model="hf-rankops")`
  and in lm-eval's results files, however lm-eval was run (the model's `get_model_info`, the one
  hook lm-eval gives a model into its results): per task the strict and tie-pessimistic
  decompositions, token count and tie rate;
- `rankops lm-eval ...` (rankops.cli.lm_eval) prints them as a table next to lm-eval's perplexities.

The windows are lm-eval's own (disjoint windows of max_length tokens, the first token scored
after a prefix token); `rankops eval` scores exactly the same ones with
`Protocol(lm_eval_windows=True)` (`--lm-eval-windows`).

Local corpora: the task `rankops_local_text` in `TASKS_DIR` reads any corpus `rankops eval`
reads (a text file, a folder, .jsonl, .parquet, a built-in name) from `--metadata corpus=PATH`
or the environment variable RANKOPS_LM_EVAL_CORPUS; `local_task(PATH)` writes a task of its own
for one corpus and returns its include path and name. Both work offline.

Example:
    >>> import lm_eval
    >>> from lm_eval.tasks import TaskManager
    >>> from rankops.integrations.lm_eval import local_task
    >>> include_path, task = local_task("austen.txt")
    >>> results = lm_eval.simple_evaluate(model="hf-rankops", model_args="pretrained=gpt2,device=cpu",
    ...     tasks=[task], task_manager=TaskManager(include_path=include_path))
    >>> results["config"]["rankops"]["tasks"][task]["decomposition"]["error_entropy"]
"""
from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import rankops
from rankops.accumulate import RankAccumulator
from rankops.atomic import write_atomic

TASKS_DIR = Path(__file__).resolve().with_name("lm_eval_tasks")
CORPUS_ENV = "RANKOPS_LM_EVAL_CORPUS"
RESULTS_FORMAT = 1


@dataclass
class _Batch:
    """One forward pass of lm-eval's scoring loop, while its rows are being matched."""
    inps: list          # [B][T] input ids as lm-eval built them (right-padded)
    logits: torch.Tensor  # [B, T, V] raw logits
    labels: torch.Tensor  # [B, T] the scored targets, -100 elsewhere
    extra: list = field(default_factory=list)  # (row, start, continuation) beyond the row's first
    next_row: int = 0


# HFLM's private methods this adapter overrides, with the signatures it was written against
# (lm-eval 0.4.13, the range pinned in pyproject.toml; tests/test_lm_eval.py checks both).
# lm-eval offers no public hook to the logits of its rolling log-likelihood loop.
PRIVATE_HFLM_OVERRIDES = {
    "_loglikelihood_tokens": ("self", "requests", "disable_tqdm", "override_bs"),
    "_model_call": ("self", "inps", "attn_mask", "labels"),
    "_select_cont_toks": ("self", "logits", "contlen", "inplen"),
}


@register_model("hf-rankops")
class RankopsHFLM(HFLM):
    """lm-eval's `hf` model that also decomposes the cross-entropy of rolling log-likelihood
    tasks. Model argument `rankops_backend` (default "auto") picks the rankops kernel.

    Accumulators add up over every run of the same instance; clear `accumulators` to start over.
    """

    _rankops_task = None   # the rolling task being scored; None outside loglikelihood_rolling
    _pending = None        # {input ids: [continuation, ...]} of the windows not yet matched
    _batch = None

    def __init__(self, *args, rankops_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"hf-rankops decomposes causal language models; this model is {self.backend}")
        self.rankops_backend = rankops_backend
        self.rankops_vocab_size = len(self.tokenizer)  # logits past the tokenizer's vocabulary never count
        self.accumulators: dict = {}

    # -- results ---------------------------------------------------------------------------

    @property
    def decompositions(self) -> dict:
        """{task: Decomposition} over every rolling task run so far."""
        return {task: acc.decompose() for task, acc in self.accumulators.items()}

    @property
    def decomposition(self):
        """The Decomposition of every token scored so far, all tasks together (None before any)."""
        if not self.accumulators:
            return None
        return functools.reduce(operator.add, self.accumulators.values()).decompose()

    def rankops_results(self) -> dict:
        """JSON-ready: per task the strict and tie-pessimistic decompositions and the windows."""
        return {
            "format": RESULTS_FORMAT,
            "rankops": rankops.__version__,
            "backend": self.rankops_backend,
            "vocab_size": self.rankops_vocab_size,
            "windows": {"kind": "lm-eval loglikelihood_rolling", "max_length": self.max_length,
                        "prefix_token_id": self.prefix_token_id,
                        "rankops_eval": "Protocol(lm_eval_windows=True), rankops eval --lm-eval-windows"},
            "tasks": {task: {"n_tokens": acc.n_tokens, "decomposition": acc.decompose().as_dict(),
                             "decomposition_pessimistic": acc.decompose("pessimistic").as_dict(),
                             "tie_rate": acc.tie_rate}
                      for task, acc in self.accumulators.items()},
        }

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self.accumulators:
            info["rankops"] = self.rankops_results()
        return info

    # -- hooks into HFLM's scoring loop -------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.world_size > 1:
            # lm-eval pads the last process's share with copies of a window, which would count twice.
            raise NotImplementedError("hf-rankops runs in one process; data-parallel runs are not supported")
        by_task: dict = {}
        for i, req in enumerate(requests):
            by_task.setdefault(req.task_name or "loglikelihood_rolling", []).append(i)
        out = [None] * len(requests)
        for task, indices in by_task.items():  # one task at a time, so each window knows its task
            self._rankops_task = task
            try:
                nlls = super().loglikelihood_rolling([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            finally:
                self._rankops_task = None
            for i, nll in zip(indices, nlls):
                out[i] = nll
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self._rankops_task is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # Each window is found again by the input lm-eval builds for it, (context + continuation)
        # cut to max_length + 1 and without its last token; windows with the same input share
        # one row when logits_cache is on (lm-eval's grouping key is the same sequence).
        pending: dict = {}
        for _, context, continuation in requests:
            key = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            pending.setdefault(key, []).append(list(continuation))
        self._pending = pending
        try:
            out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            self._flush()
        finally:
            self._pending, self._batch = None, None
        if pending:
            raise RuntimeError(f"hf-rankops: {sum(map(len, pending.values()))} rolling windows were scored "
                               "without their logits reaching rankops (has lm-eval's HFLM changed?)")
        return out

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._pending is not None:
            self._flush()  # before the next forward pass, so two batches of logits never coexist
        logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if self._pending is not None:
            self._batch = _Batch(inps=inps.tolist(), logits=logits,
                                 labels=torch.full(inps.shape, -100, dtype=torch.long, device=logits.device))
        return logits

    def _select_cont_toks(self, logits, contlen=None, inplen=None):
        if self._batch is not None:
            self._claim_row(inplen)
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _claim_row(self, inplen: int) -> None:
        # HFLM selects the scored logits row by row, in batch order, right after the forward pass.
        b = self._batch
        row = b.next_row
        b.next_row += 1
        key = tuple(b.inps[row][:inplen])
        continuations = self._pending.get(key)
        if not continuations:
            raise RuntimeError(f"hf-rankops: row {row} of a batch matches no pending rolling window "
                               "(has lm-eval's HFLM changed?)")
        taken = continuations if self.logits_cache else continuations[:1]
        for i, cont in enumerate(taken):
            start = inplen - len(cont)  # the continuation's logits end at the input's last position
            if i == 0:
                b.labels[row, start:inplen] = torch.tensor(cont, dtype=torch.long)
            else:
                b.extra.append((row, start, cont))
        del continuations[:len(taken)]
        if not continuations:
            del self._pending[key]
        if b.next_row == len(b.inps):
            self._flush()

    def _flush(self) -> None:
        b, self._batch = self._batch, None
        if b is None:
            return
        acc = self.accumulators.get(self._rankops_task)
        if acc is None:
            acc = self.accumulators[self._rankops_task] = RankAccumulator(self.rankops_vocab_size)
        acc.update(b.logits, b.labels, backend=self.rankops_backend)
        for row, start, cont in b.extra:
            acc.update(b.logits[row, start:start + len(cont)],
                       torch.tensor(cont, dtype=torch.long, device=b.logits.device), backend=self.rankops_backend)


# -- local corpora --------------------------------------------------------------------------

def load_corpus_dataset(rankops_corpus: Optional[dict] = None, corpus: Optional[str] = None,
                        text_field: str = "text", split: str = "train", n_documents: Optional[int] = None,
                        seed: int = 42, **_metadata):
    """lm-eval `custom_dataset` of the rankops tasks: a corpus as `rankops eval` reads it (same
    documents, same order), as {"test": Dataset with a "text" column}.

    lm-eval calls it with the task's metadata and dataset_kwargs as keyword arguments. A task
    written by local_task fixes its options in dataset_kwargs (`rankops_corpus`, one key, so
    that metadata given to every task cannot collide with them); `rankops_local_text` takes them
    from lm-eval's metadata (`--metadata corpus=PATH text_field=...`), the corpus else from
    RANKOPS_LM_EVAL_CORPUS. n_documents selects as rankops eval does (shuffled with seed)."""
    import datasets

    from rankops.eval.corpora import load_corpus
    from rankops.eval.windows import select_documents
    if rankops_corpus is not None:
        return load_corpus_dataset(**rankops_corpus)
    spec = corpus or os.environ.get(CORPUS_ENV)
    if not spec:
        raise ValueError(f"rankops_local_text needs a corpus: pass --metadata corpus=PATH to lm-eval, set "
                         f"{CORPUS_ENV}=PATH, or write a task with rankops.integrations.lm_eval.local_task(PATH)")
    documents = load_corpus(str(spec), text_field=text_field, split=split).documents
    if n_documents is not None:
        documents = select_documents(documents, int(n_documents), int(seed))
    return {"test": datasets.Dataset.from_dict({"text": list(documents)})}


class LocalTask(NamedTuple):
    include_path: str   # for TaskManager(include_path=...) or lm-eval's --include_path
    task_name: str


def local_task(corpus, *, task_name: Optional[str] = None, text_field: str = "text", split: str = "train",
               n_documents: Optional[int] = None, seed: int = 42, output_dir=None) -> LocalTask:
    """Writes an lm-eval task (loglikelihood_rolling; word and byte perplexity, bits per byte)
    for one corpus, anything `rankops eval --corpus` takes, and returns its include path and name.

    The corpus is read once here, so that a bad one fails now, with rankops' message. The task
    folder goes to output_dir, or to a cache folder keyed by the options
    ($RANKOPS_CACHE/lm_eval_tasks, default ~/.cache/rankops). Every document is scored (no
    shuffle) unless n_documents is given: then the same selection as rankops eval's
    (`--n-documents`, `--seed`)."""
    import re

    from rankops.eval.corpora import load_corpus
    spec = str(corpus)
    loaded = load_corpus(spec, text_field=text_field, split=split)
    source = str(Path(spec).resolve()) if Path(spec).exists() else spec  # built-in names stay names
    name = task_name or "rankops_" + (re.sub(r"[^A-Za-z0-9_]+", "_", loaded.name).strip("_") or "corpus")
    options = {"corpus": source, "text_field": text_field, "split": split, "n_documents": n_documents, "seed": seed}
    if output_dir is None:
        key = hashlib.sha256(json.dumps([name, options], sort_keys=True).encode()).hexdigest()[:12]
        root = Path(os.environ.get("RANKOPS_CACHE", Path.home() / ".cache" / "rankops"))
        output_dir = root / "lm_eval_tasks" / f"{name}-{key}"
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"# Written by rankops.integrations.lm_eval.local_task for {source}\n"
            f"task: {name}\n"
            "custom_dataset: !function rankops.integrations.lm_eval.load_corpus_dataset\n"
            f"dataset_kwargs: {json.dumps({'rankops_corpus': options})}\n"
            + (TASKS_DIR / "rankops_local_text.yaml").read_text().split("# -- shared --\n", 1)[1])
    write_atomic(folder / f"{name}.yaml", text.encode())
    return LocalTask(str(folder), name)
