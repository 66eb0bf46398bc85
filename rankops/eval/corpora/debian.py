"""The built-in corpora's Debian packages, fetched into rankops' cache without root.

`apt-get download` fetches a package's .deb file alone (no dependencies, no root, no dpkg
lock) and `dpkg-deb -x` unpacks it into a folder of our own: CACHE/corpora/debian/<package>/
holds the package's files as they would lie under / (usr/lib/bible.data, ...). The built-ins
look there first, then in the system's own paths (builtin.py). Installing the packages with
apt instead would work too, but r-cran-janeaustenr pulls in all of R (hundreds of packages)
to provide one 1.6 MB data file.

Where the system's package lists do not know a package (a fresh container: apt-get update
never ran), the lists are read once into CACHE/corpora/debian/.apt/ (about 10 MB, no root) and
the download retried from them (then removed). A package is complete once its `.complete` marker exists: it
is unpacked to a temporary folder and renamed into place, so a killed fetch leaves nothing that
looks complete.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Sequence

from rankops.eval.cache import UNPACKED_MARKER, debian_dir
from rankops.eval.corpora.corpus import CorpusError

__all__ = ["FetchError", "fetch_packages", "is_unpacked", "package_root"]


class FetchError(CorpusError):
    """The corpora's Debian packages could not be fetched or unpacked; the message says what to
    do instead."""


def package_root(package: str) -> Path:
    """Where `package`'s files lie once fetched: its file /usr/lib/x is package_root/usr/lib/x."""
    return debian_dir() / package


def is_unpacked(package: str) -> bool:
    return (package_root(package) / UNPACKED_MARKER).is_file()


def _log(message: str) -> None:
    print(f"rankops corpora fetch: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=str(cwd), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, LC_ALL="C"))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} gave no answer in {timeout:g} s")
    except OSError as exc:
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


def _apt_error(proc: subprocess.CompletedProcess) -> str:
    """apt's own error lines (E: ...), else the last line it printed."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return "; ".join(errors or lines[-1:]) or f"exit status {proc.returncode}"


def _apt_options(private_lists: bool) -> List[str]:
    opts = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # As root, apt downloads as the _apt user, who cannot write into a private folder: it
        # then warns and downloads as root anyway. Say so up front and keep the output clean.
        opts += ["-o", "APT::Sandbox::User=root"]
    if private_lists:
        state = debian_dir() / ".apt"
        opts += ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}"]
    return opts


def _update_private_lists(log: Callable[[str], None]) -> None:
    state = debian_dir() / ".apt"
    for d in (state / "lists" / "partial", state / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    log(f"this system's package lists do not have them; reading Debian's lists into {state} "
        "(about 20 MB, removed afterwards)")
    t0 = time.monotonic()
    proc = _run(["apt-get", "-q", *_apt_options(True), "update"], state, timeout=900)
    if proc.returncode != 0:
        raise FetchError(f"apt-get update (into {state}) failed: {_apt_error(proc)}")
    log(f"package lists read in {time.monotonic() - t0:.0f} s")


def _download(packages: List[str], into: Path, log: Callable[[str], None]) -> dict:
    """{package: its .deb file in `into`}, by apt-get download (see the module doc)."""
    cmd = ["apt-get", "-q", "download"]
    proc = _run(cmd[:2] + _apt_options(False) + cmd[2:] + packages, into, timeout=900)
    if proc.returncode != 0:
        first_error = _apt_error(proc)
        try:
            _update_private_lists(log)
        except FetchError as exc:
            raise FetchError(f"apt-get download {' '.join(packages)} failed ({first_error}), and so "
                             f"did reading the package lists: {exc}") from None
        proc = _run(cmd[:2] + _apt_options(True) + cmd[2:] + packages, into, timeout=900)
        if proc.returncode != 0:
            raise FetchError(f"apt-get download {' '.join(packages)} failed: {_apt_error(proc)}")
    debs = {}
    for package in packages:
        found = sorted(into.glob(f"{package}_*.deb"))
        if not found:
            raise FetchError(f"apt-get download {package} succeeded but left no {package}_*.deb "
                             f"in {into}")
        debs[package] = found[-1]
    return debs


def _unpack(package: str, deb: Path, workdir: Path) -> None:
    staging = workdir / f"{package}.unpacked"
    proc = _run(["dpkg-deb", "-x", str(deb), str(staging)], workdir, timeout=300)
    if proc.returncode != 0:
        raise FetchError(f"dpkg-deb -x {deb.name} failed: {_apt_error(proc)}")
    (staging / UNPACKED_MARKER).write_text(deb.name + "\n")
    target = package_root(package)
    if target.exists():  # a previous fetch (--force) or a half-finished one: set aside, then gone
        old = workdir / f"{package}.old"
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, target)


def fetch_packages(packages: Iterable[str], *, force: bool = False,
                   log: Callable[[str], None] = _log) -> List[Path]:
    """Fetches and unpacks the Debian packages (those not yet unpacked, or all with force=True)
    into rankops' cache; returns their folders. Raises FetchError saying what to do instead."""
    packages = list(dict.fromkeys(packages))
    todo = [p for p in packages if force or not is_unpacked(p)]
    for p in packages:
        if p not in todo:
            log(f"{p}: already in {package_root(p)}")
    if not todo:
        return [package_root(p) for p in packages]
    missing_tools = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing_tools:
        raise FetchError(f"fetching {' '.join(todo)} needs {' and '.join(missing_tools)} (Debian, "
                         "Ubuntu and their derivatives), which this system does not have")
    root = debian_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            workdir = Path(tmp)
            log(f"downloading {' '.join(todo)} (apt-get download: the packages alone, no root)")
            t0 = time.monotonic()
            debs = _download(todo, workdir, log)
            size_mb = sum(d.stat().st_size for d in debs.values()) / 1e6
            log(f"downloaded {size_mb:.1f} MB in {time.monotonic() - t0:.1f} s")
            for package, deb in debs.items():
                _unpack(package, deb, workdir)
                log(f"{package}: unpacked into {package_root(package)}")
        shutil.rmtree(root / ".apt", ignore_errors=True)  # private package lists, if read
    except OSError as exc:
        raise FetchError(f"cannot write into rankops' cache {root}: {exc} (set RANKOPS_CACHE to a "
                         "writable folder)") from exc
    return [package_root(p) for p in packages]
