"""rankops' cache folder: GGUF conversions named by content, written atomically and safely under
races and full disks; `rankops cache` lists the folder and `rankops cache clear` empties it."""
import errno
import hashlib
import json
import os
import shutil

import pytest

from rankops.cli import main
from rankops.eval.cache import CONVERTED_PREFIX, SOURCE_RECORD, UNPACKED_MARKER, cache_entries, clear_cache
from rankops.eval.models import _conversion_dir, _store_conversion, file_sha256


@pytest.fixture
def cache(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("RANKOPS_CACHE", str(root))
    return root


def test_a_conversion_is_named_by_the_files_content_alone(cache, tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "a").mkdir()
    original = tmp_path / "a" / "model.gguf"
    original.write_bytes(data)
    (tmp_path / "b").mkdir()
    copy = tmp_path / "b" / "renamed.gguf"  # another venv, another name: the same bytes
    shutil.copyfile(original, copy)
    link = tmp_path / "...gguf"
    link.symlink_to(original)
    expected = cache / "gguf" / f"{CONVERTED_PREFIX}{hashlib.sha256(data).hexdigest()[:24]}"
    def folder(path):
        return _conversion_dir(file_sha256(path))
    assert file_sha256(original) == hashlib.sha256(data).hexdigest()
    assert folder(original) == folder(copy) == folder(link) == expected
    os.utime(copy, ns=(1, 1))  # a reinstall changes the mtime, not the bytes
    assert folder(copy) == expected
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed: another model
    assert folder(copy) != expected and folder(copy).parent == expected.parent


class _Saves:
    """Stands for a transformers model or tokenizer: save_pretrained writes its files."""

    def __init__(self, files, error=None):
        self.files, self.error = files, error

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        for name, text in self.files.items():
            (folder / name).write_text(text)
        if self.error is not None:
            raise self.error


SOURCE = {"gguf": "/x/model.gguf", "name": "model.gguf", "size": 3, "sha256": "ab" * 32}


def test_a_conversion_is_stored_whole_and_named_only_when_complete(cache):
    target = cache / "gguf" / f"{CONVERTED_PREFIX}{'ab' * 12}"
    assert _store_conversion(_Saves({"config.json": "{}", "model.safetensors": "w"}),
                             _Saves({"tokenizer.json": "t"}), target, SOURCE) is True
    assert sorted(p.name for p in target.iterdir()) == \
        sorted(["config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD])
    assert json.loads((target / SOURCE_RECORD).read_text()) == SOURCE
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary folder left


def test_another_process_that_finished_first_wins(cache):
    target = cache / "gguf" / f"{CONVERTED_PREFIX}{'ab' * 12}"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"first": true}')
    assert _store_conversion(_Saves({"config.json": "{}"}), _Saves({}), target, SOURCE) is True
    assert (target / "config.json").read_text() == '{"first": true}'  # not replaced, not mixed
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_full_disk_costs_a_warning_not_the_evaluation(cache):
    target = cache / "gguf" / f"{CONVERTED_PREFIX}{'ab' * 12}"
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.warns(RuntimeWarning, match=r"could not cache the conversion of /x/model.gguf .*No space left"):
        assert _store_conversion(_Saves({"config.json": "{}"}, error=full), _Saves({}), target, SOURCE) is False
    assert list(target.parent.iterdir()) == []  # nothing half-written stays behind


def _layout(root):
    """A cache with one entry of each kind; returns {relative path: (kind, bytes)}."""
    def write(rel, n):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * n)
    write(f"gguf/{CONVERTED_PREFIX}{'0' * 24}/model.safetensors", 1000)
    write(f"gguf/{CONVERTED_PREFIX}{'0' * 24}/config.json", 10)
    (root / "gguf" / f"{CONVERTED_PREFIX}{'0' * 24}" / SOURCE_RECORD).write_text('{"name": "m.gguf"}')
    record = len('{"name": "m.gguf"}')
    write("gguf/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef/config.json", 20)     # an earlier rankops' name
    write("gguf/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef/model.safetensors", 300)
    write(f"gguf/.{CONVERTED_PREFIX}{'1' * 24}.tmp4242/model.safetensors", 40)  # a killed conversion
    write("gguf/gemma-3-270m-q4_k_m-a5fd3b62230aa5ec.gguf", 50)
    write("gguf/notes.txt", 5)
    write("gguf/my-own-model.gguf", 7)  # not rankops': listed, never removed
    write("corpora/debian/bible-kjv-text/usr/share/bible/kjv.txt", 60)
    write(f"corpora/debian/bible-kjv-text/{UNPACKED_MARKER}", 4)
    write("corpora/debian/.fetch-x1y2/bible-kjv_4.40_amd64.deb", 70)  # a killed fetch's workdir
    write("corpora/debian/dict-jargon/usr/share/jargon.txt", 80)     # unpacked, but no marker
    return {f"gguf/{CONVERTED_PREFIX}{'0' * 24}": ("conversion", 1010 + record),
            "gguf/SmolLM2-135M-Instruct.Q4_1-0123456789abcdef": ("stale", 320),
            f"gguf/.{CONVERTED_PREFIX}{'1' * 24}.tmp4242": ("unfinished", 40),
            "gguf/gemma-3-270m-q4_k_m-a5fd3b62230aa5ec.gguf": ("gguf", 50),
            "gguf/notes.txt": ("other", 5),
            "gguf/my-own-model.gguf": ("other", 7),
            "corpora/debian/bible-kjv-text": ("corpus", 64),
            "corpora/debian/.fetch-x1y2": ("unfinished", 70),
            "corpora/debian/dict-jargon": ("unfinished", 80)}


def test_cache_entries_name_each_kind_and_its_size(cache):
    expected = _layout(cache)
    entries = cache_entries()
    assert {str(e["path"].relative_to(cache)): (e["kind"], e["size"]) for e in entries} == expected
    assert [e["source"] for e in entries if e["kind"] == "conversion"] == ["m.gguf"]


def test_clear_removes_what_is_made_again_offline_and_all_removes_the_rest(cache):
    expected = _layout(cache)
    removed = clear_cache()
    assert sorted(e["kind"] for e in removed) == ["conversion", "stale"] + ["unfinished"] * 3
    left = {str(e["path"].relative_to(cache)): (e["kind"], e["size"]) for e in cache_entries()}
    assert left == {k: v for k, v in expected.items() if v[0] in ("gguf", "other", "corpus")}
    assert sorted(e["kind"] for e in clear_cache(everything=True)) == ["corpus", "gguf"]
    assert sorted(str(e["path"].relative_to(cache)) for e in cache_entries()) == \
        ["gguf/my-own-model.gguf", "gguf/notes.txt"]


def test_the_cache_command_lists_and_clears(cache, capsys):
    assert main(["cache"]) == 0  # no cache folder yet: an empty listing, not an error
    assert f"rankops' cache: {cache} (0.0 MB in 0 entries)" in capsys.readouterr().out
    _layout(cache)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "in 9 entries" in out and "| corpora/debian/bible-kjv-text | built-in corpus" in out
    assert f"| gguf/{CONVERTED_PREFIX}{'0' * 24} | GGUF converted to safetensors (m.gguf) |" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 5 entries" in capsys.readouterr().err
    assert main(["cache", "clear", "--all"]) == 0
    assert "removed 2 entries" in capsys.readouterr().err
    assert sorted(e["kind"] for e in cache_entries()) == ["other", "other"]
