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
