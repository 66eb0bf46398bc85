"""rankops.atomic: the one writer of every file rankops writes."""
import os
import stat

import pytest
import torch

from rankops.atomic import save_atomic, write_atomic


def test_write_atomic_replaces_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, b"old")
    write_atomic(str(path), b"new")  # a str works too
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_permissions_are_those_of_an_ordinary_open(tmp_path):
    write_atomic(tmp_path / "a", b"")
    with open(tmp_path / "b", "wb"):
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == stat.S_IMODE(os.stat(tmp_path / "b").st_mode)


def test_save_atomic_round_trips_and_a_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    save_atomic(path, {"x": torch.arange(3)})
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    with pytest.raises(Exception):
        save_atomic(path, {"f": lambda: 0})  # not picklable: fails mid-write
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def _killed_mid_write(folder):
    """A process that dies (like a SIGKILL: os._exit, no cleanup) halfway through writing
    folder/checkpoint.pt; returns what it left in the folder."""
    import subprocess
    import sys
    code = ("import os, sys; from pathlib import Path; from rankops.atomic import _replace\n"
            "def die(f):\n    f.write(b'half a checkpoint'); f.flush(); os._exit(137)\n"
            "_replace(Path(sys.argv[1]) / 'checkpoint.pt', die)\n")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    return sorted(p.name for p in folder.iterdir())


def test_a_killed_writer_leaves_a_recognisable_temporary_that_the_next_run_removes(tmp_path):
    from rankops.atomic import remove_stale_temporaries
    (tmp_path / "notes.tmp").write_text("not ours")
    (tmp_path / ".hidden.tmp").write_text("not ours either")
    left = _killed_mid_write(tmp_path)
    stale = [n for n in left if n.startswith(".checkpoint.pt.") and n.endswith(".rankops-tmp")]
    assert len(stale) == 1 and not (tmp_path / "checkpoint.pt").exists()
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "notes.tmp"]
    assert remove_stale_temporaries(tmp_path / "no-such-folder") == []


def test_save_atomic_fsyncs_the_file_and_the_folder_as_write_atomic_does(tmp_path, monkeypatch):
    import rankops.atomic
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(rankops.atomic.os, "fsync", spy)
    for write in (lambda p: write_atomic(p, b"x"), lambda p: save_atomic(p, {"x": torch.arange(3)})):
        synced.clear()
        write(tmp_path / "f")
        assert synced == [False, True]  # the file's bytes, then the folder's rename
