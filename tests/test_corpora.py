"""rankops.eval.corpora: local files, folders, JSON Lines, Parquet, saved datasets, the hub
(offline), the error cases, and the built-in corpora where their Debian packages are installed."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

from rankops.eval.corpora import builtin
from rankops.eval.corpora import Corpus, CorpusError, builtin_corpora, load_corpus

BUILTIN_NAMES = ("austen", "kjv", "cpython-stdlib")


def has_module(name):
    return importlib.util.find_spec(name) is not None


# --- text files and folders -----------------------------------------------------------------

def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First line.\nSecond line.  \n\n\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert isinstance(corpus, Corpus)
    assert corpus.documents == ("First line.\nSecond line.",)
    assert (corpus.name, corpus.source, corpus.kind, corpus.license) == \
        ("notes", str(path), "user", "unknown")


def test_markdown_and_other_suffixes_are_text(tmp_path):
    (tmp_path / "README.md").write_text("# Title\n\nBody\n", encoding="utf-8")
    (tmp_path / "data.log").write_text("a log line\n", encoding="utf-8")
    assert load_corpus(str(tmp_path / "README.md")).documents == ("# Title\n\nBody",)
    assert load_corpus(tmp_path / "data.log").documents == ("a log line",)  # a Path works too


def test_text_file_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(CorpusError, match="UTF-8") as info:
        load_corpus(str(path))
    assert str(path) in str(info.value)


def test_folder_one_document_per_text_file_sorted(tmp_path):
    root = tmp_path / "docs"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n", encoding="utf-8")
    (root / "b" / "deep" / "c.md").write_text("gamma", encoding="utf-8")
    (root / "b" / "a.txt").write_text("beta  \n", encoding="utf-8")
    (root / "z.txt").write_text("   \n\n", encoding="utf-8")               # whitespace only
    (root / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")     # binary: NUL bytes
    (root / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))       # not UTF-8
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main", encoding="utf-8")
    corpus = load_corpus(str(root))
    # Sorted by relative path: a.txt, b/a.txt, b/deep/c.md.
    assert corpus.documents == ("alpha", "beta", "gamma")
    assert (corpus.name, corpus.kind, corpus.source) == ("docs", "user", str(root))


def test_empty_file_and_folder_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n", encoding="utf-8")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "binary.dat").write_bytes(b"\x00\x01\x02")
    for spec in (empty, blank, folder):
        with pytest.raises(CorpusError, match="empty") as info:
            load_corpus(str(spec))
        assert str(spec) in str(info.value)


# --- JSON Lines -----------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "set.jsonl"
    write_jsonl(path, [{"text": "one", "id": 1}, {"text": "two \n"}, {"text": ""},
                       {"text": None}, {"text": "three"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # a blank line is not a record
    corpus = load_corpus(str(path))
    assert corpus.documents == ("one", "two", "three")
    assert corpus.name == "set"


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "set.jsonl"
    write_jsonl(path, [{"content": "x", "text": "y"}, {"content": "z"}])
    assert load_corpus(str(path), text_field="content").documents == ("x", "z")


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 3 is not valid JSON") as info:
        load_corpus(str(path))
    assert "bad.jsonl" in str(info.value)


def test_jsonl_missing_field_names_the_line_and_field(tmp_path):
    path = tmp_path / "missing.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(CorpusError, match=r"line 2 has no field 'text'") as info:
        load_corpus(str(path))
    assert "body" in str(info.value)  # the fields it does have


def test_jsonl_non_object_and_non_string(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 1"):
        load_corpus(str(path))
    path = tmp_path / "number.jsonl"
    write_jsonl(path, [{"text": 3}])
    with pytest.raises(CorpusError, match="not a string"):
        load_corpus(str(path))


def test_jsonl_all_empty_is_an_error(tmp_path):
    path = tmp_path / "blank.jsonl"
    write_jsonl(path, [{"text": "  "}, {"text": ""}])
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(path))


# --- Parquet and saved datasets ---------------------------------------------------------------

@pytest.mark.skipif(not has_module("pyarrow"), reason="pyarrow is not installed")
def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["first", None, "second\n", " "], "n": [1, 2, 3, 4],
                             "body": ["a", "b", "c", "d"]}), path)
    corpus = load_corpus(str(path))
    assert corpus.documents == ("first", "second")
    assert corpus.name == "table"
    assert load_corpus(str(path), text_field="body").documents == ("a", "b", "c", "d")
    with pytest.raises(CorpusError, match="no column 'missing'"):
        load_corpus(str(path), text_field="missing")


@pytest.mark.skipif(not has_module("datasets"), reason="datasets is not installed")
def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a doc", "", "another doc"]}).save_to_disk(str(single))
    assert load_corpus(str(single)).documents == ("a doc", "another doc")

    both = tmp_path / "both"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["train one", "train two"]}),
        "test": datasets.Dataset.from_dict({"body": ["test one"]}),
    }).save_to_disk(str(both))
    assert load_corpus(str(both), text_field="body").documents == ("train one", "train two")
    assert load_corpus(str(both), text_field="body", split="test").documents == ("test one",)
    with pytest.raises(CorpusError, match="no split 'validation'"):
        load_corpus(str(both), text_field="body", split="validation")
    with pytest.raises(CorpusError, match="no column 'text'"):
        load_corpus(str(both))


# --- names that are not paths -----------------------------------------------------------------

def test_unknown_name_lists_builtins_and_path_types():
    with pytest.raises(CorpusError, match="unknown corpus 'no-such-corpus'") as info:
        load_corpus("no-such-corpus")
    message = str(info.value)
    for name in BUILTIN_NAMES:
        assert name in message
    assert ".jsonl" in message and ".parquet" in message


def test_missing_path_is_unknown_not_a_hub_id(tmp_path):
    for spec in (str(tmp_path / "absent.txt"), "data/absent.jsonl", "./a/b"):
        with pytest.raises(CorpusError, match="unknown corpus"):
            load_corpus(spec)


def test_empty_spec_is_an_error():
    with pytest.raises(CorpusError):
        load_corpus("  ")


def _offline(monkeypatch):
    """No test may touch the network: offline mode, read at import by datasets and its hub
    client, so patched in their config modules too when they are already imported."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if has_module("datasets"):
        import datasets.config
        for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if hasattr(datasets.config, attr):
                monkeypatch.setattr(datasets.config, attr, True)
    if has_module("huggingface_hub"):
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("spec", ["rankops-test/no-such-dataset", "hf:rankops-test/no-such-dataset"])
def test_hub_id_unreachable_is_a_fast_corpus_error(monkeypatch, tmp_path, spec):
    _offline(monkeypatch)
    monkeypatch.chdir(tmp_path)  # so that no local folder of that name can shadow the id
    start = time.perf_counter()
    with pytest.raises(CorpusError) as info:
        load_corpus(spec)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "hub could not be reached" in message and "rankops-test/no-such-dataset" in message
    for name in BUILTIN_NAMES:
        assert name in message


def test_hub_probe_fails_fast_without_offline_mode(monkeypatch, tmp_path):
    """Without offline mode, an unreachable endpoint is reported at once, not after datasets'
    half a minute of retries. The endpoint is a closed local port: no traffic leaves the host."""
    pytest.importorskip("datasets")
    import datasets.config
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(datasets.config, attr):
            monkeypatch.setattr(datasets.config, attr, False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    called = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: called.append(a))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(CorpusError, match="could not be reached") as info:
        load_corpus("hf:rankops-test/no-such-dataset")
    assert time.perf_counter() - start < 10
    assert called == [] and "127.0.0.1:9" in str(info.value)


def test_existing_folder_shadows_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "owner" / "name" / "doc.txt").write_text("local", encoding="utf-8")
    assert load_corpus("owner/name").documents == ("local",)


# --- built-in corpora -------------------------------------------------------------------------

def test_builtin_corpora_listing():
    listing = builtin_corpora()
    assert [b["name"] for b in listing][:3] == list(BUILTIN_NAMES)
    for b in listing:
        assert set(b) == {"name", "kind", "description", "license", "install", "packages", "available"}
        assert b["kind"] in ("prose", "code") and isinstance(b["available"], bool)
        assert b["license"] and b["description"] and b["install"]
    by_name = {b["name"]: b for b in listing}
    assert by_name["austen"]["install"] == "rankops corpora fetch austen"
    assert by_name["austen"]["packages"] == ("r-cran-janeaustenr",)
    assert by_name["kjv"]["packages"] == ("bible-kjv", "bible-kjv-text")
    assert by_name["cpython-stdlib"]["available"] is True
    assert by_name["cpython-stdlib"]["license"] == "PSF-2.0"


def require(name):
    """Skips unless the built-in can be loaded here, saying what would provide it."""
    entry = {b["name"]: b for b in builtin_corpora()}[name]
    if not entry["available"]:
        pytest.skip(f"built-in corpus {name!r} is not available here; provide it with "
                    f"`{entry['install']}`")
    return load_corpus(name)


def check_common(corpus, name, kind):
    assert (corpus.name, corpus.kind) == (name, kind)
    assert corpus.documents and all(isinstance(d, str) and d and d == d.rstrip()
                                    for d in corpus.documents)
    assert corpus.license and corpus.license != "unknown"
    assert Path(corpus.source).exists()


def check_deterministic(name, corpus):
    assert load_corpus(name) is corpus  # cached
    builtin.BUILTINS[name].load.cache_clear()
    try:
        again = load_corpus(name)
    finally:
        builtin.BUILTINS[name].load.cache_clear()
    assert again is not corpus and again == corpus


def test_austen():
    corpus = require("austen")
    check_common(corpus, "austen", "prose")
    # 50 + 61 + 48 + 55 + 31 + 24 chapters, in publication order.
    assert len(corpus.documents) == 269
    assert corpus.documents[0].startswith("The family of Dashwood had long been settled in Sussex")
    assert corpus.documents[50].startswith("It is a truth universally acknowledged")
    assert corpus.documents[-1].endswith("national importance.")  # Persuasion's last line
    text = "\n".join(corpus.documents)
    for phrase in ("Elizabeth Bennet", "Emma Woodhouse", "Fanny Price", "Catherine Morland",
                   "Anne Elliot", "Marianne"):
        assert phrase in text
    # Headings, volume lines, end markers and front/back matter are gone.
    for boilerplate in ("CHAPTER I\n", "Chapter 1\n", "VOLUME I", "THE END", "FINIS",
                        "By Jane Austen", "A NOTE ON THE TEXT", "ADVERTISEMENT BY THE AUTHORESS"):
        assert boilerplate not in text
    assert 3_000_000 < len(text) < 5_000_000
    assert min(len(d) for d in corpus.documents) > 1000
    check_deterministic("austen", corpus)


def test_austen_chapter_rule():
    lines = ["TITLE", "", "VOLUME I", "", "CHAPTER I", "", "One.", "Chapter about x",
             "", "VOLUME II", "Chapter 2", "Two.  ", "", "THE END", "Afterword"]
    assert builtin.split_chapters(lines) == ["One.\nChapter about x", "Two."]


def test_kjv():
    corpus = require("kjv")
    check_common(corpus, "kjv", "prose")
    assert len(corpus.documents) == 1189
    assert corpus.documents[0].startswith("In the beginning God created the heaven and the earth.")
    assert corpus.documents[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sum(d.count("\n") + 1 for d in corpus.documents) == 31102  # one verse a line
    assert any("Jesus wept." in d.split("\n") for d in corpus.documents)  # John 11:35, a line
    psalm_117 = [d for d in corpus.documents if d.startswith("O Praise the LORD, all ye nations")]
    assert len(psalm_117) == 1 and psalm_117[0].count("\n") == 1  # the shortest chapter: 2 verses
    check_deterministic("kjv", corpus)


def test_cpython_stdlib():
    corpus = require("cpython-stdlib")
    check_common(corpus, "cpython-stdlib", "code")
    root = Path(corpus.source)
    files = builtin.stdlib_files()
    assert files == sorted(files) and len(files) > 300
    for rel in files:
        parts = Path(rel).parts
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts), rel
    documents = set(corpus.documents)
    assert any("def " in d for d in corpus.documents)
    assert (root / "bisect.py").read_text(encoding="utf-8").rstrip() in documents
    # No test file's text is a document (where this Python ships its test suite).
    test_files = sorted((root / "test").glob("test_*.py"))[:50] if (root / "test").is_dir() else []
    for path in test_files:
        assert path.read_text(encoding="utf-8", errors="replace").rstrip() not in documents
    assert len(corpus.documents) > 300
    check_deterministic("cpython-stdlib", corpus)


# --- built-ins fetched into rankops' cache (no download: fake trees, a fake apt-get) ---------------

from rankops.eval.corpora import debian  # noqa: E402
from rankops.eval.cache import debian_dir  # noqa: E402

SYSTEM_AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data")
SYSTEM_BIBLE = (Path("/usr/bin/bible"), Path("/usr/lib/bible.data"), Path("/usr/lib/bible.data.conc"))


@pytest.fixture
def only_the_cache(tmp_path, monkeypatch):
    """rankops' cache in tmp_path, and no system path: a built-in is found in the cache or nowhere."""
    monkeypatch.setenv("RANKOPS_CACHE", str(tmp_path / "cache"))
    for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(builtin, "_R_LIBRARIES", ())
    monkeypatch.setattr(builtin, "_BIBLE_DATA_DIRS", ())
    monkeypatch.setattr(builtin.shutil, "which", lambda name, *a, **k: None)
    for b in builtin.BUILTINS.values():
        b.load.cache_clear()
    yield tmp_path / "cache"
    for b in builtin.BUILTINS.values():
        b.load.cache_clear()


def unpacked(package, files):
    """A fake unpacked package in rankops' cache: {path under /: source file or bytes}."""
    root = debian.package_root(package)
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            target.write_bytes(content.read_bytes())
            target.chmod(content.stat().st_mode)
        else:
            target.write_bytes(content)
    (root / ".complete").write_text("test\n")
    return root


def test_missing_builtins_say_what_to_run(only_the_cache):
    for name in ("austen", "kjv"):
        assert {b["name"]: b for b in builtin_corpora()}[name]["available"] is False
        with pytest.raises(CorpusError) as info:
            load_corpus(name)
        message = str(info.value)
        assert f"run `rankops corpora fetch {name}`" in message and "\n" not in message


def test_cache_is_searched_before_the_system(only_the_cache, tmp_path, monkeypatch):
    site = "usr/lib/R/site-library/janeaustenr/data"
    root = unpacked("r-cran-janeaustenr", {f"{site}/Rdata.rdx": b"", f"{site}/Rdata.rdb": b""})
    system = tmp_path / "system"
    for f in ("Rdata.rdx", "Rdata.rdb"):
        (system / "janeaustenr" / "data").mkdir(parents=True, exist_ok=True)
        (system / "janeaustenr" / "data" / f).write_bytes(b"")
    monkeypatch.setattr(builtin, "_R_LIBRARIES", (str(system),))
    assert builtin._austen_data_dir() == root / site
    unpacked("bible-kjv-text", {"usr/lib/bible.data": b""})
    assert builtin._bible_data_dir() == debian.package_root("bible-kjv-text") / "usr" / "lib"


@pytest.mark.skipif(not (SYSTEM_AUSTEN / "Rdata.rdb").is_file() or not has_module("rdata"),
                    reason="needs janeaustenr's data (to copy into a fake cache) and rdata")
def test_austen_from_the_cache(only_the_cache):
    site = "usr/lib/R/site-library/janeaustenr/data"
    unpacked("r-cran-janeaustenr", {f"{site}/{f.name}": f for f in SYSTEM_AUSTEN.iterdir()})
    corpus = load_corpus("austen")
    assert corpus.source == str(debian.package_root("r-cran-janeaustenr") / site)
    assert len(corpus.documents) == 269


@pytest.mark.skipif(not all(p.is_file() for p in SYSTEM_BIBLE),
                    reason="needs Debian's bible-kjv (to copy into a fake cache)")
def test_kjv_from_the_cache(only_the_cache):
    exe, data, conc = SYSTEM_BIBLE
    unpacked("bible-kjv", {"usr/bin/bible": exe})
    unpacked("bible-kjv-text", {"usr/lib/bible.data": data, "usr/lib/bible.data.conc": conc})
    corpus = load_corpus("kjv")
    assert corpus.source == str(debian.package_root("bible-kjv-text") / "usr" / "lib" / "bible.data")
    assert len(corpus.documents) == 1189


FAKE_APT = """#!/bin/sh
# apt-get as the test needs it: 'download' copies the prebuilt .deb files into the working folder,
# but only once 'update' has read private lists (Dir::State::Lists) when REQUIRE_UPDATE is set.
echo "$@" >> "$FAKE_APT_LOG"
case "$*" in
  *update*) mkdir -p "$FAKE_APT_STATE"; touch "$FAKE_APT_STATE/updated"; exit 0 ;;
  *download*)
    if [ -n "$REQUIRE_UPDATE" ] && ! { echo "$*" | grep -q Dir::State::Lists && [ -e "$FAKE_APT_STATE/updated" ]; }; then
      echo "E: Unable to locate package r-cran-janeaustenr" >&2; exit 100
    fi
    cp "$FAKE_DEBS"/*.deb . ;;
esac
"""


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A fake apt-get on PATH serving a real .deb (built with dpkg-deb) that holds a fake
    janeaustenr data folder; rankops' cache in tmp_path."""
    import shutil
    import subprocess
    monkeypatch.setenv("RANKOPS_CACHE", str(tmp_path / "cache"))
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        pytest.skip("needs dpkg-deb to build a .deb")
    tree = tmp_path / "tree"
    data = tree / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    (data / "Rdata.rdx").write_bytes(b"index")
    (data / "Rdata.rdb").write_bytes(b"data")
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text("Package: r-cran-janeaustenr\nVersion: 1.0.0-1\n"
                                             "Architecture: all\nMaintainer: test <t@t>\nDescription: test\n")
    debs = tmp_path / "debs"
    debs.mkdir()
    subprocess.run([dpkg_deb, "--build", str(tree), str(debs / "r-cran-janeaustenr_1.0.0-1_all.deb")],
                   check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(dpkg_deb).parent}")
    monkeypatch.setenv("FAKE_DEBS", str(debs))
    monkeypatch.setenv("FAKE_APT_LOG", str(tmp_path / "apt.log"))
    monkeypatch.setenv("FAKE_APT_STATE", str(tmp_path / "apt-state"))
    return tmp_path / "apt.log"


@pytest.mark.parametrize("lists_known", [True, False])
def test_fetch_unpacks_into_the_cache(fake_apt, monkeypatch, lists_known):
    if not lists_known:
        monkeypatch.setenv("REQUIRE_UPDATE", "1")
    messages = []
    roots = debian.fetch_packages(["r-cran-janeaustenr"], log=messages.append)
    root = debian.package_root("r-cran-janeaustenr")
    assert roots == [root] and debian.is_unpacked("r-cran-janeaustenr")
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    assert (data / "Rdata.rdb").read_bytes() == b"data"
    calls = fake_apt.read_text().splitlines()
    assert len(calls) == (1 if lists_known else 3)  # download; or download, update, download
    assert any("downloaded" in m for m in messages)
    assert not (debian_dir() / ".apt").exists()  # private lists removed
    assert [p.name for p in debian_dir().iterdir()] == ["r-cran-janeaustenr"]  # no temporaries
    # Already there: nothing is downloaded again, unless forced.
    debian.fetch_packages(["r-cran-janeaustenr"], log=messages.append)
    assert len(fake_apt.read_text().splitlines()) == len(calls)
    (data / "Rdata.rdb").write_bytes(b"changed")
    debian.fetch_packages(["r-cran-janeaustenr"], force=True, log=messages.append)
    assert (data / "Rdata.rdb").read_bytes() == b"data"


def test_fetch_failure_is_one_clear_error(fake_apt, monkeypatch, tmp_path):
    (tmp_path / "bin" / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package x' >&2\nexit 100\n")
    with pytest.raises(debian.FetchError, match="apt-get download r-cran-janeaustenr failed.*Unable to locate"):
        debian.fetch_packages(["r-cran-janeaustenr"], log=lambda m: None)
    assert not debian.is_unpacked("r-cran-janeaustenr")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(debian.FetchError, match="needs apt-get and dpkg-deb"):
        debian.fetch_packages(["r-cran-janeaustenr"], log=lambda m: None)
