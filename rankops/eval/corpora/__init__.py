"""Corpora for `rankops eval`: lists of text documents, from built-ins, local files or the hub.

One module per source: builtin (the built-ins and their one registry; r_data decodes their R
data), files (local files and folders), hub (the Hugging Face hub); corpus holds the Corpus
they all return. This module dispatches.

`load_corpus(spec)` resolves `spec` in this order:

1. a built-in name (`builtin_corpora()` lists them and whether each can be loaded here);
2. an existing path: a text file (one document), a folder (one document per text file, or a
   `datasets` `save_to_disk` folder), a `.jsonl` file (one document per line) or a `.parquet`
   file (one document per row);
3. a Hugging Face hub dataset id, `owner/name` or `hf:owner/name`;
4. anything else is an error.

Every document is stripped of trailing whitespace, and empty ones are dropped; a corpus with no
documents left is an error. Every problem a user can cause is a `CorpusError` naming the spec.
"""
import os
from pathlib import Path

from rankops.eval.corpora.builtin import BUILTINS, builtin_corpora, builtins_listing
from rankops.eval.corpora.corpus import Corpus, CorpusError
from rankops.eval.corpora.files import load_path
from rankops.eval.corpora.hub import hub_id, load_hub

__all__ = ["Corpus", "CorpusError", "builtin_corpora", "load_corpus"]


def load_corpus(spec: str, *, text_field: str = "text", split: str = "train") -> Corpus:
    """The corpus `spec` names: a built-in name, a path, or a hub dataset id (see the module doc).

    `text_field` is the field (JSON Lines) or column (Parquet, datasets) holding the text;
    `split` the split of a hub dataset or of a saved DatasetDict. Raises CorpusError.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise CorpusError(f"corpus spec must be a string or a path, not {type(spec).__name__}")
    spec = os.fspath(spec)
    if not spec.strip():
        raise CorpusError("corpus spec is empty: give a built-in name "
                          f"({', '.join(BUILTINS)}), a path or a hub dataset id")
    if spec in BUILTINS:
        return BUILTINS[spec].load()
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if exists:
        return load_path(path, spec, text_field, split)
    ident = hub_id(spec)
    if ident is not None:
        return load_hub(ident, spec, text_field, split)
    raise CorpusError(f"unknown corpus {spec!r}: not a built-in name, no such file or folder, "
                      "and not a hub dataset id (owner/name or hf:owner/name). Built-in corpora: "
                      f"{builtins_listing()}. Paths: a text file (.txt, .md, ...: one document), "
                      "a folder (one document per text file, or a datasets save_to_disk folder), "
                      ".jsonl (one document per line, its text_field) or .parquet (its "
                      "text_field column)")
