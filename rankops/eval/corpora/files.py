"""Corpora from local files and folders: a text file (one document), a folder (one document
per text file, or a `datasets` save_to_disk folder), JSON Lines (one document per line) and
Parquet (one document per row)."""
import json
import os
from pathlib import Path
from typing import List, Optional

from rankops.eval.corpora.corpus import Corpus, CorpusError, make_corpus

__all__ = ["dataset_texts", "load_path"]


def _decode(raw: bytes) -> Optional[str]:
    """The UTF-8 text of a file's bytes, or None for a binary or undecodable file."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _field_value(value, spec, where, text_field):
    """A text field's value as a document: strings as they are, nulls as empty documents."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"corpus {spec!r}: {where}: field {text_field!r} is a "
                          f"{type(value).__name__}, not a string")
    return value


def _load_text_file(path: Path, spec: str) -> List[str]:
    text = _decode(path.read_bytes())
    if text is None:
        raise CorpusError(f"corpus {spec!r}: {path} is not a UTF-8 text file")
    return [text]


def _load_jsonl(path: Path, spec: str, text_field: str) -> List[str]:
    documents = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise CorpusError(f"corpus {spec!r}: {path} line {lineno} is not valid UTF-8")
            if not line.strip():
                continue  # blank lines (a trailing newline, separators) carry no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus {spec!r}: {path} line {lineno} is not valid JSON: "
                                  f"{e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise CorpusError(f"corpus {spec!r}: {path} line {lineno} is a JSON "
                                  f"{type(record).__name__}, not an object with a "
                                  f"{text_field!r} field")
            if text_field not in record:
                raise CorpusError(f"corpus {spec!r}: {path} line {lineno} has no field "
                                  f"{text_field!r} (its fields: {', '.join(map(str, record)) or 'none'}); "
                                  "choose the field with text_field=")
            documents.append(_field_value(record[text_field], spec, f"{path} line {lineno}",
                                          text_field))
    return documents


def _load_parquet(path: Path, spec: str, text_field: str) -> List[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            schema = pq.read_schema(path)
            if text_field not in schema.names:
                raise CorpusError(f"corpus {spec!r}: {path} has no column {text_field!r} (its "
                                  f"columns: {', '.join(schema.names)}); choose it with text_field=")
            values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        except CorpusError:
            raise
        except Exception as e:
            raise CorpusError(f"corpus {spec!r}: cannot read {path} as Parquet: "
                              f"{type(e).__name__}: {e}") from e
    else:
        try:
            import pandas as pd
            frame = pd.read_parquet(path)
        except ImportError as e:
            raise CorpusError(f"corpus {spec!r}: reading Parquet needs pyarrow: "
                              f"pip install pyarrow ({str(e).splitlines()[0]})") from e
        except Exception as e:
            raise CorpusError(f"corpus {spec!r}: cannot read {path} as Parquet: "
                              f"{type(e).__name__}: {e}") from e
        if text_field not in frame.columns:
            raise CorpusError(f"corpus {spec!r}: {path} has no column {text_field!r} (its "
                              f"columns: {', '.join(map(str, frame.columns))}); choose it with "
                              "text_field=")
        values = [None if isinstance(v, float) and v != v else v  # pandas' NaN for null
                  for v in frame[text_field].tolist()]
    return [_field_value(v, spec, f"{path} row {i}", text_field) for i, v in enumerate(values)]


_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def dataset_texts(ds, spec: str, where: str, text_field: str, split: str) -> List[str]:
    """The text_field column of a datasets Dataset, or of `split` of a DatasetDict."""
    if isinstance(ds, dict) or isinstance(getattr(ds, "column_names", None), dict):
        splits = list(ds.keys())
        if split not in splits:
            raise CorpusError(f"corpus {spec!r}: {where} has no split {split!r} (its splits: "
                              f"{', '.join(splits)}); choose one with split=")
        ds = ds[split]
    names = list(ds.column_names)
    if text_field not in names:
        raise CorpusError(f"corpus {spec!r}: {where} has no column {text_field!r} (its columns: "
                          f"{', '.join(names)}); choose it with text_field=")
    return [_field_value(v, spec, f"{where} row {i}", text_field)
            for i, v in enumerate(ds[text_field])]


def _load_saved_dataset(path: Path, spec: str, text_field: str, split: str) -> List[str]:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(f"corpus {spec!r}: {path} is a datasets save_to_disk folder; reading it "
                          f"needs the datasets package: pip install datasets ({e})") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CorpusError(f"corpus {spec!r}: datasets.load_from_disk({str(path)!r}) failed: "
                          f"{type(e).__name__}: {e}") from e
    return dataset_texts(ds, spec, str(path), text_field, split)


def _load_folder(path: Path, spec: str) -> List[str]:
    # Every file below the folder, sorted by relative path; hidden files and folders (.git,
    # .DS_Store) are skipped, and so is every file that is binary (has a NUL byte) or not UTF-8.
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                full = Path(dirpath) / f
                files.append((full.relative_to(path).as_posix(), full))
    documents = []
    for _, full in sorted(files):
        try:
            text = _decode(full.read_bytes())
        except OSError:
            continue
        if text is not None:
            documents.append(text)
    return documents


def load_path(path: Path, spec: str, text_field: str, split: str) -> Corpus:
    name = path.resolve().name if path.is_dir() else path.stem
    name = name or "corpus"
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVED_DATASET_MARKERS):
            documents = _load_saved_dataset(path, spec, text_field, split)
        else:
            documents = _load_folder(path, spec)
    else:
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                documents = _load_jsonl(path, spec, text_field)
            elif suffix == ".parquet":
                documents = _load_parquet(path, spec, text_field)
            else:
                documents = _load_text_file(path, spec)
        except OSError as e:
            raise CorpusError(f"corpus {spec!r}: cannot read {path}: {e}") from e
    return make_corpus(name, documents, source=str(path), kind="user", license="unknown",
                        spec=spec)
