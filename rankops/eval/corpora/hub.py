"""Corpora from the Hugging Face hub, through `datasets`, failing in seconds when it cannot be
reached."""
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Optional

from rankops.eval.corpora.builtin import builtins_listing
from rankops.eval.corpora.corpus import Corpus, CorpusError, make_corpus
from rankops.eval.corpora.files import dataset_texts

__all__ = ["hub_id", "load_hub"]


# owner/name as the hub spells them: letters, digits, '-', '_', '.'; a name never starts with
# '.' or '-'. A path-like spec (more slashes, a file extension, ./ or ~) is not an id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")
_FILE_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".py", ".rst"}


def hub_id(spec: str) -> Optional[str]:
    if spec.startswith("hf:"):
        ident = spec[3:]
        return ident if _HUB_ID_RE.match(ident) else None
    if _HUB_ID_RE.match(spec) and Path(spec).suffix.lower() not in _FILE_SUFFIXES:
        return spec
    return None


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _hub_offline(datasets) -> bool:
    config = getattr(datasets, "config", None)
    return any(_truthy(os.environ.get(v, "")) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) \
        or any(getattr(config, a, False) is True for a in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_unreachable(timeout: float = 5.0) -> Optional[str]:
    """Why the hub's endpoint cannot be reached, or None when a TCP connection to it opens.

    Without network, `datasets` retries for about half a minute before giving up; this check
    fails in seconds instead. It is skipped behind a proxy, where a direct connection says
    nothing. The probe runs in a daemon thread so that a stalled DNS lookup cannot hold us.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname
    if not host:
        return None
    port = url.port or (80 if url.scheme == "http" else 443)
    outcome: dict = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = f"{endpoint}: {e}"

    thread = threading.Thread(target=probe, name="rankops-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if outcome.get("ok"):
        return None
    return outcome.get("error", f"{endpoint}: no answer in {timeout:g} s")


def load_hub(ident: str, spec: str, text_field: str, split: str) -> Corpus:
    def fail(why: str, cause: Optional[BaseException] = None):
        raise CorpusError(f"corpus {spec!r}: the Hugging Face hub could not be reached or has no "
                          f"dataset {ident!r} ({why}). Built-in corpora: {builtins_listing()}; "
                          "or pass a local .txt/.md/.jsonl/.parquet file or a folder") from cause
    try:
        import datasets
    except ImportError as e:
        fail("the datasets package is not installed: pip install datasets", e)
    if not _hub_offline(datasets):
        why = _hub_unreachable()
        if why is not None:
            fail(f"no connection to {why}; to use a dataset already in the local cache, set "
                 "HF_HUB_OFFLINE=1")
    try:
        ds = datasets.load_dataset(ident, split=split)
    except Exception as e:  # no network, offline mode, not found, no such split, gated, ...
        fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", e)
    documents = dataset_texts(ds, spec, f"hub dataset {ident!r} split {split!r}", text_field,
                               split)
    return make_corpus(ident.split("/")[-1], documents, source=f"hf:{ident}", kind="user",
                        license="unknown", spec=spec)
