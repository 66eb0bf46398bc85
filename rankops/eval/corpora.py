"""Corpora for `rankops eval`: lists of text documents, from built-ins, local files or the hub.

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
from __future__ import annotations

import bz2
import functools
import json
import lzma
import os
import re
import shutil
import socket
import struct
import subprocess
import sysconfig
import threading
import urllib.parse
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

__all__ = ["Corpus", "CorpusError", "builtin_corpora", "load_corpus"]


class CorpusError(ValueError):
    """A corpus cannot be loaded: the message names the corpus spec and says why."""


@dataclass(frozen=True)
class Corpus:
    name: str          # short name: the built-in name, or derived from the path / id
    documents: tuple   # tuple[str, ...], non-empty strings, in a deterministic order
    source: str        # where it came from: a file path, folder, package, or hub id
    kind: str          # "prose", "code" or "user"
    license: str       # e.g. "public domain", "PSF-2.0", or "unknown" for user data

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:  # the default would print every document
        chars = sum(len(d) for d in self.documents)
        return (f"Corpus(name={self.name!r}, documents=<{len(self.documents)} documents, "
                f"{chars} chars>, source={self.source!r}, kind={self.kind!r}, "
                f"license={self.license!r})")


# --------------------------------------------------------------------------------------------
# Built-in corpora
# --------------------------------------------------------------------------------------------

# janeaustenr keeps the six novels as R data; a binary package (Debian's, or CRAN's installed
# with install.packages) stores them in a lazy-load database (data/Rdata.rdx + Rdata.rdb), a
# source tree as one data/<novel>.rda each. Both are read with the `rdata` package.
_R_LIBRARIES = ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library",
                "/usr/local/lib/R/library")
# In the order of publication (and of janeaustenr::austen_books()).
_AUSTEN_NOVELS = (("sensesensibility", "Sense and Sensibility"),
                  ("prideprejudice", "Pride and Prejudice"),
                  ("mansfieldpark", "Mansfield Park"),
                  ("emma", "Emma"),
                  ("northangerabbey", "Northanger Abbey"),
                  ("persuasion", "Persuasion"))

# bible-kjv-text ships the text in the `bible` program's own compressed, random-access format
# (bible.data, with a concordance in bible.data.conc); the program itself is the decoder.
_BIBLE_DATA_DIRS = ("/usr/lib", "/usr/share/bible-kjv", "/usr/local/lib")
_KJV_CHAPTERS = 1189
_KJV_VERSES = 31102

_AUSTEN_LICENSE = "public domain (the novels, via Project Gutenberg); MIT (the janeaustenr package)"
_KJV_LICENSE = "public domain (the 1611 text; Crown copyright still applies in the UK)"
_STDLIB_LICENSE = "PSF-2.0"


def _r_library_dirs() -> List[str]:
    dirs = []
    for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        dirs.extend(d for d in os.environ.get(var, "").split(os.pathsep) if d)
    dirs.extend(_R_LIBRARIES)
    return dirs


def _austen_data_dir() -> Optional[Path]:
    for lib in _r_library_dirs():
        data = Path(lib).expanduser() / "janeaustenr" / "data"
        if (data / "Rdata.rdx").is_file() and (data / "Rdata.rdb").is_file():
            return data
        if all((data / f"{n}.rda").is_file() for n, _ in _AUSTEN_NOVELS):
            return data
    return None


def _bible_data_dir() -> Optional[Path]:
    for d in _BIBLE_DATA_DIRS:
        if (Path(d) / "bible.data").is_file():
            return Path(d)
    return None


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class _Builtin:
    name: str
    kind: str
    description: str
    license: str
    install: str

    def available(self) -> bool:
        if self.name == "austen":
            return _austen_data_dir() is not None and _has_module("rdata")
        if self.name == "kjv":
            return shutil.which("bible") is not None and _bible_data_dir() is not None
        if self.name == "cpython-stdlib":
            return _stdlib_root().is_dir()
        raise AssertionError(self.name)


_BUILTINS = (
    _Builtin("austen", "prose",
             "Jane Austen's six completed novels, one document per chapter "
             "(Debian's r-cran-janeaustenr, read with the rdata package)",
             _AUSTEN_LICENSE, "apt-get install r-cran-janeaustenr && pip install rdata"),
    _Builtin("kjv", "prose",
             "The King James Bible, one document per chapter, one verse per line "
             "(Debian's bible-kjv, decoded by its `bible` program)",
             _KJV_LICENSE, "apt-get install bible-kjv"),
    _Builtin("cpython-stdlib", "code",
             "The running interpreter's CPython standard library, one document per .py file "
             "(no test directories, no site-packages)",
             _STDLIB_LICENSE, "none: ships with the Python interpreter"),
)
_BUILTIN_BY_NAME = {b.name: b for b in _BUILTINS}


def builtin_corpora() -> List[dict]:
    """One dict per built-in corpus: name, kind, description, license, install, available."""
    return [dict(name=b.name, kind=b.kind, description=b.description, license=b.license,
                 install=b.install, available=b.available()) for b in _BUILTINS]


def _builtins_listing() -> str:
    return ", ".join(f"{b['name']} ({'available' if b['available'] else 'needs: ' + b['install']})"
                     for b in builtin_corpora())


# --- austen ---------------------------------------------------------------------------------

def _read_lazyload_db(data_dir: Path) -> dict:
    """{name: R object converted to Python} from an R lazy-load database (Rdata.rdx/.rdb).

    The .rdx index is an RDS file: list(variables = list(name = c(offset, length)), ...,
    compressed = TRUE | 2 | 3). Each .rdb entry at that offset is a 4-byte big-endian length of
    the serialized object, then (compression 2 or 3 only) a type byte, then the compressed
    serialization ('Z' zlib, '2' bzip2, 'X' xz, '0' none; plain zlib when compressed is TRUE).
    """
    import rdata
    with warnings.catch_warnings():
        # rdata warns that ".rdx" is an unusual extension and that raw serializations have no
        # file header ("assumed RDS"): both expected here.
        warnings.simplefilter("ignore")
        return _read_lazyload_db_quietly(rdata, data_dir)


def _read_lazyload_db_quietly(rdata, data_dir: Path) -> dict:
    index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))
    compressed = int(index["compressed"][0])
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset):int(offset) + int(length)]
        (size,) = struct.unpack(">I", entry[:4])
        if compressed in (2, 3):
            kind, payload = entry[4:5], entry[5:]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": bytes}[kind](payload)
        else:
            data = zlib.decompress(entry[4:])
        if len(data) != size:
            raise ValueError(f"{data_dir}: entry {name} decompressed to {len(data)} bytes, "
                             f"expected {size}")
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def _austen_novel_lines(data_dir: Path) -> dict:
    import rdata
    if (data_dir / "Rdata.rdx").is_file():
        objects = _read_lazyload_db(data_dir)
    else:
        objects = {}
        for n, _ in _AUSTEN_NOVELS:
            objects.update(rdata.read_rda(data_dir / f"{n}.rda"))
    return {n: [str(line) for line in objects[n]] for n, _ in _AUSTEN_NOVELS}


# The chapter rule. Each novel is a character vector, one element per line of the Project
# Gutenberg text. A chapter heading is a line that is only "Chapter" and a number, Arabic or
# Roman, in any case ("Chapter 1", "CHAPTER XLVIII"): janeaustenr's own rule
# (^chapter [\divxlc]), anchored to the whole line so that no sentence starting "Chapter" can
# match. A document is the text between one heading and the next, without the heading. Dropped:
# everything before the first heading (title, author, Northanger Abbey's "Advertisement by the
# authoress"), Emma's "VOLUME I/II/III" lines, and everything from an end marker on ("THE END",
# "FINIS", and Northanger Abbey's editorial "A NOTE ON THE TEXT"). Lines are kept as they are
# (Gutenberg's hard line breaks, blank lines between paragraphs); leading and trailing blank
# lines are removed. This gives 50 + 61 + 48 + 55 + 31 + 24 = 269 chapters.
_CHAPTER_RE = re.compile(r"^\s*chapter\s+(\d+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
_VOLUME_RE = re.compile(r"^\s*volume\s+(\d+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
_END_RE = re.compile(r"^\s*(the\s+end|finis|a\s+note\s+on\s+the\s+text)\.?\s*$", re.IGNORECASE)


def _split_chapters(lines: List[str]) -> List[str]:
    chapters: List[List[str]] = []
    for line in lines:
        if _END_RE.match(line):
            break
        if _CHAPTER_RE.match(line):
            chapters.append([])
        elif chapters and not _VOLUME_RE.match(line):
            chapters[-1].append(line.rstrip())
    return ["\n".join(c).strip("\n") for c in chapters]


@functools.lru_cache(maxsize=None)
def _load_austen() -> Corpus:
    data_dir = _austen_data_dir()
    if data_dir is None:
        raise CorpusError("built-in corpus 'austen' is not installed: janeaustenr's data was not "
                          f"found in {', '.join(_r_library_dirs())}; install it with "
                          f"`{_BUILTIN_BY_NAME['austen'].install}`")
    if not _has_module("rdata"):
        raise CorpusError("built-in corpus 'austen' needs the rdata package to read R data: "
                          "pip install rdata")
    try:
        novels = _austen_novel_lines(data_dir)
    except Exception as e:  # a janeaustenr or rdata version this reader does not know
        raise CorpusError(f"built-in corpus 'austen': could not read janeaustenr's data in "
                          f"{data_dir}: {type(e).__name__}: {e}") from e
    documents = []
    for key, title in _AUSTEN_NOVELS:
        chapters = _split_chapters(novels[key])
        if not chapters:
            raise CorpusError(f"built-in corpus 'austen': no chapter headings found in {title} "
                              f"({data_dir})")
        documents.extend(chapters)
    return _make_corpus("austen", documents, source=str(data_dir), kind="prose",
                        license=_AUSTEN_LICENSE, spec="austen")


# --- kjv ------------------------------------------------------------------------------------

# With pretty-printing off (-f), `bible` prints one verse per line as "<Book><chapter>:<verse>
# <text>", e.g. "1Sm3:10 And the LORD came...". The book abbreviation can start with a digit.
_VERSE_RE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


@functools.lru_cache(maxsize=None)
def _load_kjv() -> Corpus:
    exe, data_dir = shutil.which("bible"), _bible_data_dir()
    if exe is None or data_dir is None:
        raise CorpusError("built-in corpus 'kjv' is not installed (no `bible` program or no "
                          f"bible.data); install it with `{_BUILTIN_BY_NAME['kjv'].install}`")
    # The whole text is one verse range; -p pins the data file (by default `bible` looks in
    # the working directory first), stdin is closed so that it never waits for commands.
    cmd = [exe, "-p", str(data_dir), "-f", "Gen1:1-Rev22:21"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                              cwd=str(data_dir), env={**os.environ, "COLUMNS": "100000"})
    except (OSError, subprocess.SubprocessError) as e:
        raise CorpusError(f"built-in corpus 'kjv': running {' '.join(cmd)} failed: {e}") from e
    if proc.returncode != 0:
        raise CorpusError(f"built-in corpus 'kjv': {' '.join(cmd)} exited with "
                          f"{proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    text = proc.stdout.decode("utf-8", errors="replace")
    chapters: dict = {}  # (book, chapter) -> verses, in order of appearance
    n_verses = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _VERSE_RE.match(line)
        if m is None:
            raise CorpusError(f"built-in corpus 'kjv': unexpected output line from `bible`: "
                              f"{line[:80]!r}")
        chapters.setdefault((m[1], int(m[2])), []).append(m[4].rstrip())
        n_verses += 1
    if len(chapters) != _KJV_CHAPTERS or n_verses != _KJV_VERSES:
        raise CorpusError(f"built-in corpus 'kjv': `bible` printed {n_verses} verses in "
                          f"{len(chapters)} chapters, expected {_KJV_VERSES} in {_KJV_CHAPTERS}")
    documents = ["\n".join(verses) for verses in chapters.values()]
    return _make_corpus("kjv", documents, source=str(data_dir / "bible.data"), kind="prose",
                        license=_KJV_LICENSE, spec="kjv")


# --- cpython-stdlib ---------------------------------------------------------------------------

# Directories left out wherever they occur: the test suites, installed third-party packages and
# bytecode caches. Also left out: the build's config-* directory and _sysconfigdata_*.py, which
# are generated when Python is built and describe that machine, not library source.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                     "__pycache__", "lib-dynload"}


def _stdlib_files() -> List[str]:
    """Relative paths (POSIX-style, sorted) of the standard library's .py files in the corpus."""
    root = _stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS
                       and not (rel_dir == Path(".") and d.startswith("config-"))]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata_"):
                found.append((rel_dir / f).as_posix())
    return sorted(found)


@functools.lru_cache(maxsize=None)
def _load_stdlib() -> Corpus:
    root = _stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"built-in corpus 'cpython-stdlib': the standard library directory "
                          f"{root} does not exist")
    documents = []
    for rel in _stdlib_files():
        try:
            documents.append((root / rel).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # unreadable, or not valid UTF-8 (a few Pythons ship latin-1 test data)
    return _make_corpus("cpython-stdlib", documents, source=str(root), kind="code",
                        license=_STDLIB_LICENSE, spec="cpython-stdlib")


_LOADERS = {"austen": _load_austen, "kjv": _load_kjv, "cpython-stdlib": _load_stdlib}


# --------------------------------------------------------------------------------------------
# Local files and folders
# --------------------------------------------------------------------------------------------

def _clean(documents: Iterable) -> Tuple[str, ...]:
    return tuple(d for d in (doc.rstrip() for doc in documents) if d)


def _make_corpus(name, documents, *, source, kind, license, spec) -> Corpus:
    docs = _clean(documents)
    if not docs:
        raise CorpusError(f"corpus {spec!r} is empty: it has no documents that are not empty "
                          f"or whitespace ({source})")
    return Corpus(name=name, documents=docs, source=source, kind=kind, license=license)


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


def _dataset_texts(ds, spec: str, where: str, text_field: str, split: str) -> List[str]:
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
    return _dataset_texts(ds, spec, str(path), text_field, split)


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


def _load_path(path: Path, spec: str, text_field: str, split: str) -> Corpus:
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
    return _make_corpus(name, documents, source=str(path), kind="user", license="unknown",
                        spec=spec)


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------

# owner/name as the hub spells them: letters, digits, '-', '_', '.'; a name never starts with
# '.' or '-'. A path-like spec (more slashes, a file extension, ./ or ~) is not an id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*$")
_FILE_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".py", ".rst"}


def _hub_id(spec: str) -> Optional[str]:
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


def _load_hub(ident: str, spec: str, text_field: str, split: str) -> Corpus:
    def fail(why: str, cause: Optional[BaseException] = None):
        raise CorpusError(f"corpus {spec!r}: the Hugging Face hub could not be reached or has no "
                          f"dataset {ident!r} ({why}). Built-in corpora: {_builtins_listing()}; "
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
    documents = _dataset_texts(ds, spec, f"hub dataset {ident!r} split {split!r}", text_field,
                               split)
    return _make_corpus(ident.split("/")[-1], documents, source=f"hf:{ident}", kind="user",
                        license="unknown", spec=spec)


# --------------------------------------------------------------------------------------------

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
                          f"({', '.join(_LOADERS)}), a path or a hub dataset id")
    if spec in _LOADERS:
        return _LOADERS[spec]()
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if exists:
        return _load_path(path, spec, text_field, split)
    ident = _hub_id(spec)
    if ident is not None:
        return _load_hub(ident, spec, text_field, split)
    raise CorpusError(f"unknown corpus {spec!r}: not a built-in name, no such file or folder, "
                      "and not a hub dataset id (owner/name or hf:owner/name). Built-in corpora: "
                      f"{_builtins_listing()}. Paths: a text file (.txt, .md, ...: one document), "
                      "a folder (one document per text file, or a datasets save_to_disk folder), "
                      ".jsonl (one document per line, its text_field) or .parquet (its "
                      "text_field column)")
