"""Atomic, durable file writes: every file rankops writes goes through here.

A reader sees the old file or the new one, never a mix, and after a power cut the new one is
on disk once the call has returned: the bytes go to a temporary file in the same folder (a
rename is atomic only within one file system), the file is flushed and fsynced, renamed over
the target, and the folder is fsynced so that the rename itself is durable.

    >>> from rankops.atomic import save_atomic, write_atomic
    >>> write_atomic("results.json", b"{}\\n")
    >>> save_atomic("accumulator.pt", {"stats": torch.zeros(3)})
"""
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["save_atomic", "write_atomic"]


def write_atomic(path, data: bytes) -> None:
    """Replaces the file at path with data, atomically and durably."""
    _replace(Path(path), lambda f: f.write(data))


def save_atomic(path, obj) -> None:
    """torch.save(obj) to path, atomically and durably (as write_atomic)."""
    import torch
    _replace(Path(path), lambda f: torch.save(obj, f))


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    folder = path.parent
    # Not tempfile.mkstemp: its files are private (0600); this one gets the permissions an
    # ordinary open() would give the target (0666 less the umask).
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
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
