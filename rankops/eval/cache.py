"""rankops' cache folder: $RANKOPS_CACHE, else ~/.cache/rankops, and what is in it.

    gguf/converted-<sha256>/   a GGUF file converted to a safetensors folder (rankops.eval.models),
                               named by the GGUF's content, with rankops-source.json saying which
    gguf/<name>-<sha256>.gguf  a GGUF reassembled from part packages (the gemma3-270m built-in)
    corpora/debian/<package>/  a built-in corpus' Debian package, unpacked (rankops.eval.corpora.debian),
                               with the marker .complete once whole

Everything here can be made again: conversions and reassembled GGUFs from the installed files,
offline; the corpora with `rankops corpora fetch`, which needs Debian's mirror. `rankops cache`
lists it (cache_entries) and `rankops cache clear` removes it (clear_cache).
"""
import json
import os
import re
import shutil
from pathlib import Path
from typing import List

__all__ = ["cache_root", "gguf_dir", "debian_dir", "cache_entries", "clear_cache", "CONVERTED_PREFIX",
           "SOURCE_RECORD", "UNPACKED_MARKER"]

CONVERTED_PREFIX = "converted-"        # the folders of GGUF conversions
SOURCE_RECORD = "rankops-source.json"  # in each: the GGUF file it was converted from
UNPACKED_MARKER = ".complete"          # in each corpus package's folder, once wholly unpacked

# Earlier builds of rankops named a conversion's folder <GGUF stem>-<16 hex digits of the file's
# path, size and mtime>: a new 0.5 GB copy for every virtual environment. Listed as stale, cleared.
_OLD_CONVERSION = re.compile(r".+-[0-9a-f]{16}$")
_REASSEMBLED = re.compile(r".+-[0-9a-f]{16}\.gguf$")  # <name>-<16 hex digits of its sha256>.gguf


def cache_root() -> Path:
    return Path(os.environ.get("RANKOPS_CACHE") or Path.home() / ".cache" / "rankops").expanduser()


def gguf_dir() -> Path:
    return cache_root() / "gguf"


def debian_dir() -> Path:
    return cache_root() / "corpora" / "debian"


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while we walked
                pass
    return total


def _debian_kind(path: Path) -> str:
    """What a top-level entry of corpora/debian/ is: a package with its marker, or what a killed
    fetch (or one running now) left: its .fetch-* folder, the private lists .apt, a package
    folder without its marker."""
    return "corpus" if (path / UNPACKED_MARKER).is_file() else "unfinished"


def _gguf_kind(path: Path) -> str:
    """What a top-level entry of gguf/ is (see the module docstring)."""
    name = path.name
    if name.startswith(".") and ".tmp" in name:
        return "unfinished"  # a conversion or reassembly killed, or one running now
    if path.is_dir() and name.startswith(CONVERTED_PREFIX):
        return "conversion"
    if path.is_file() and _REASSEMBLED.match(name):
        return "gguf"
    if path.is_dir() and _OLD_CONVERSION.match(name) and (path / "config.json").is_file():
        return "stale"
    return "other"


def cache_entries() -> List[dict]:
    """The cache's entries: {"path", "kind", "size" (bytes), "source"}, kind one of conversion,
    gguf, corpus, stale (a conversion under the old per-path name), unfinished (what a killed
    conversion or fetch left, or one running now), other."""
    entries = []
    for folder, kind_of in ((gguf_dir(), _gguf_kind), (debian_dir(), _debian_kind)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            kind = kind_of(path)
            source = ""
            if kind == "conversion":
                try:
                    source = json.loads((path / SOURCE_RECORD).read_text()).get("name", "")
                except (OSError, ValueError):
                    source = ""
            entries.append({"path": path, "kind": kind, "size": _size(path), "source": source})
    return entries


# clear_cache() removes these kinds: all that is made again offline, in seconds to a minute.
# everything=True adds the reassembled GGUFs and the corpora (a download). Files rankops did not
# write ("other": a model of the user's own kept in gguf/, say) are never removed.
_CLEARED = ("conversion", "stale", "unfinished")
_CLEARED_ALL = _CLEARED + ("gguf", "corpus")


def clear_cache(everything: bool = False) -> List[dict]:
    """Removes the GGUF conversions, stale and unfinished ones included (everything=True: the
    reassembled GGUFs and the corpora too; never what rankops did not write). Returns the entries
    removed. A conversion running now in another process loses its temporary folder and warns
    that it could not cache."""
    removed = []
    for entry in cache_entries():
        if entry["kind"] in (_CLEARED_ALL if everything else _CLEARED):
            path = entry["path"]
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(entry)
    return removed
