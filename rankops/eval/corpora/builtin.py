"""The built-in corpora: public-domain prose and code from Debian packages (or the interpreter),
so that `rankops eval` runs offline. BUILTINS is their one registry.

A Debian package's files are looked for first where `rankops corpora fetch` unpacks them
(rankops' cache: debian.package_root), then where apt installs them (/usr/...)."""
import functools
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from rankops.eval.corpora.corpus import Corpus, CorpusError, make_corpus
from rankops.eval.corpora.debian import package_root
from rankops.eval.corpora.r_data import read_lazyload_db

__all__ = ["BUILTINS", "Builtin", "builtin_corpora"]


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
_AUSTEN_PACKAGES = ("r-cran-janeaustenr",)
_KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")  # the `bible` program; its data
_AUSTEN_INSTALL = "rankops corpora fetch austen"
_KJV_INSTALL = "rankops corpora fetch kjv"
_EVAL_EXTRA = 'pip install "rankops[eval]"'


def _r_library_dirs() -> List[str]:
    dirs = [str(package_root(_AUSTEN_PACKAGES[0]) / "usr" / "lib" / "R" / "site-library")]
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


def _bible_data_dirs() -> List[Path]:
    return [package_root("bible-kjv-text") / "usr" / "lib"] + [Path(d) for d in _BIBLE_DATA_DIRS]


def _bible_data_dir() -> Optional[Path]:
    return next((d for d in _bible_data_dirs() if (d / "bible.data").is_file()), None)


def _bible_program() -> Optional[str]:
    fetched = package_root("bible-kjv") / "usr" / "bin" / "bible"
    if fetched.is_file() and os.access(fetched, os.X_OK):
        return str(fetched)
    return shutil.which("bible")


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _austen_novel_lines(data_dir: Path) -> dict:
    import rdata
    if (data_dir / "Rdata.rdx").is_file():
        objects = read_lazyload_db(data_dir)
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


def split_chapters(lines: List[str]) -> List[str]:
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
        raise CorpusError("built-in corpus 'austen' is not here (janeaustenr's data is in none of "
                          f"{', '.join(_r_library_dirs())}): run `{_AUSTEN_INSTALL}` (Debian's "
                          "r-cran-janeaustenr, 1.6 MB, unpacked into rankops' cache; no root)")
    if not _has_module("rdata"):
        raise CorpusError("built-in corpus 'austen' needs the rdata package to read R data: "
                          f"{_EVAL_EXTRA}")
    try:
        novels = _austen_novel_lines(data_dir)
    except Exception as e:  # a janeaustenr or rdata version this reader does not know
        raise CorpusError(f"built-in corpus 'austen': could not read janeaustenr's data in "
                          f"{data_dir}: {type(e).__name__}: {e}") from e
    documents = []
    for key, title in _AUSTEN_NOVELS:
        chapters = split_chapters(novels[key])
        if not chapters:
            raise CorpusError(f"built-in corpus 'austen': no chapter headings found in {title} "
                              f"({data_dir})")
        documents.extend(chapters)
    return make_corpus("austen", documents, source=str(data_dir), kind="prose",
                        license=_AUSTEN_LICENSE, spec="austen")


# --- kjv ------------------------------------------------------------------------------------

# With pretty-printing off (-f), `bible` prints one verse per line as "<Book><chapter>:<verse>
# <text>", e.g. "1Sm3:10 And the LORD came...". The book abbreviation can start with a digit.
_VERSE_RE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


@functools.lru_cache(maxsize=None)
def _load_kjv() -> Corpus:
    exe, data_dir = _bible_program(), _bible_data_dir()
    if exe is None or data_dir is None:
        missing = " and ".join(what for what, found in (("the `bible` program", exe), ("bible.data", data_dir))
                               if found is None)
        raise CorpusError(f"built-in corpus 'kjv' is not here ({missing} in neither rankops' cache "
                          f"nor the system): run `{_KJV_INSTALL}` (Debian's bible-kjv and "
                          "bible-kjv-text, 2.5 MB, unpacked into rankops' cache; no root)")
    # The whole text is one verse range; -p pins the data file (by default `bible` looks in
    # the working directory first), stdin is closed so that it never waits for commands.
    cmd = [exe, "-p", str(data_dir), "-f", "Gen1:1-Rev22:21"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                              cwd=str(data_dir), env={**os.environ, "COLUMNS": "100000"})
    except (OSError, subprocess.SubprocessError) as e:
        raise CorpusError(f"built-in corpus 'kjv': running {' '.join(cmd)} failed: {e}") from e
    if proc.returncode != 0:
        # 127 from the loader: a library the program needs (libreadline8) is missing.
        raise CorpusError(f"built-in corpus 'kjv': {' '.join(cmd)} exited with "
                          f"{proc.returncode}: {proc.stderr.decode(errors='replace').strip()}"
                          + (" (the `bible` program needs libreadline8: apt-get install libreadline8)"
                             if b"libreadline" in proc.stderr else ""))
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
    return make_corpus("kjv", documents, source=str(data_dir / "bible.data"), kind="prose",
                        license=_KJV_LICENSE, spec="kjv")


# --- cpython-stdlib ---------------------------------------------------------------------------

# Directories left out wherever they occur: the test suites, installed third-party packages and
# bytecode caches. Also left out: the build's config-* directory and _sysconfigdata_*.py, which
# are generated when Python is built and describe that machine, not library source.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                     "__pycache__", "lib-dynload"}


def stdlib_files() -> List[str]:
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
    for rel in stdlib_files():
        try:
            documents.append((root / rel).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # unreadable, or not valid UTF-8 (a few Pythons ship latin-1 test data)
    return make_corpus("cpython-stdlib", documents, source=str(root), kind="code",
                        license=_STDLIB_LICENSE, spec="cpython-stdlib")


# --------------------------------------------------------------------------------------------
# The registry: each built-in once, with how to tell whether it is here and how to load it
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Builtin:
    name: str
    kind: str
    description: str
    license: str
    install: str                 # the command that provides it
    packages: tuple              # the Debian packages `rankops corpora fetch` unpacks for it
    available: Callable[[], bool]
    load: Callable[[], Corpus]   # cached: a built-in is read once per process


BUILTINS = {b.name: b for b in (
    Builtin("austen", "prose",
            "Jane Austen's six completed novels, one document per chapter "
            "(Debian's r-cran-janeaustenr, read with the rdata package)",
            _AUSTEN_LICENSE, _AUSTEN_INSTALL, _AUSTEN_PACKAGES,
            available=lambda: _austen_data_dir() is not None and _has_module("rdata"), load=_load_austen),
    Builtin("kjv", "prose",
            "The King James Bible, one document per chapter, one verse per line "
            "(Debian's bible-kjv, decoded by its `bible` program)",
            _KJV_LICENSE, _KJV_INSTALL, _KJV_PACKAGES,
            available=lambda: _bible_program() is not None and _bible_data_dir() is not None,
            load=_load_kjv),
    Builtin("cpython-stdlib", "code",
            "The running interpreter's CPython standard library, one document per .py file "
            "(no test directories, no site-packages)",
            _STDLIB_LICENSE, "none: ships with the Python interpreter", (),
            available=lambda: _stdlib_root().is_dir(), load=_load_stdlib),
)}


def builtin_corpora() -> List[dict]:
    """One dict per built-in corpus: name, kind, description, license, install, packages (the
    Debian packages it comes from), available."""
    return [dict(name=b.name, kind=b.kind, description=b.description, license=b.license,
                 install=b.install, packages=b.packages, available=b.available())
            for b in BUILTINS.values()]


def builtins_listing() -> str:
    """The built-ins in a sentence, for error messages."""
    return ", ".join(f"{b['name']} ({'available' if b['available'] else 'needs: ' + b['install']})"
                     for b in builtin_corpora())
