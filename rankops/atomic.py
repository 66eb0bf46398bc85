"""Atomic, durable file writes: every file rankops writes goes through here.

A reader sees the old file or the new one, never a mix, and after a power cut the new one is
on disk once the call has returned: the bytes go to a temporary file in the same folder (a
rename is atomic only within one file system), the file is flushed and fsynced, renamed over
the target, and the folder is fsynced so that the rename itself is durable.

A process killed mid-write (SIGKILL, power cut) can leave its temporary file behind: it is named
`.<target>.<pid>.<8 hex>.rankops-tmp`, never read as a result, and
`remove_stale_temporaries(folder)` deletes such leftovers; a command calls it on a folder it
owns before writing there (`rankops eval` on its run folder, when it starts or resumes).

    >>> from rankops.atomic import save_atomic, write_atomic
    >>> write_atomic("results.json", b"{}\\n")
    >>> save_atomic("accumulator.pt", {"stats": torch.zeros(3)})
"""
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, List

__all__ = ["remove_stale_temporaries", "save_atomic", "write_atomic"]

TEMPORARY_SUFFIX = ".rankops-tmp"
# Ours, and (".tmp") those of the versions before the suffix was made recognisable.
_TEMPORARY_NAME = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{8}(?:\.rankops-tmp|\.tmp)")


def write_atomic(path, data: bytes) -> None:
    """Replaces the file at path with data, atomically and durably."""
    _replace(Path(path), lambda f: f.write(data))


def save_atomic(path, obj) -> None:
    """torch.save(obj) to path, atomically and durably (as write_atomic: the same fsyncs)."""
    import torch
    _replace(Path(path), lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder) -> List[Path]:
    """Deletes the temporary files that killed writers left in folder; returns them.

    Only for a folder no other process is writing to at the time: a temporary file still being
    written looks the same as one whose writer died."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def temporary_name(path: Path) -> Path:
    """Where the bytes for path are written before the rename (unique per process and call)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    folder = path.parent
    # Not tempfile.mkstemp: its files are private (0600); this one gets the permissions an
    # ordinary open() would give the target (0666 less the umask).
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    # POSIX makes a rename durable only once its directory is fsynced; Windows cannot open a
    # directory this way, and some file systems refuse (EINVAL): there the rename is all we have.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
