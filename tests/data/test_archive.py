"""enwik8 and text8: corpora published as zip archives, fetched from a loopback server or added
from a local copy, unpacked into the cache streamed and checked, with their standard splits.

The real archives (36 MB and 31 MB) are not downloaded here: each test serves a small zip of the
same layout (an archive holding one member named like the corpus) and points the registry entry
at it, with the small member's own size and checksums pinned."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest

from charlm.data import archive, corpus
from charlm.errors import CharlmError
from helpers import invoke, pydoc_text

REPO = Path(__file__).resolve().parents[2]


def published(name: str) -> dict:
    """What corpora.toml pins for the real corpus (read from the file: the tests' registry
    points every URL at loopback)."""
    e = tomllib.loads((REPO / "charlm" / "data" / "corpora.toml").read_text("utf-8"))[name]
    return {"size": e["size"], "md5": e["hashes"].get("md5"), "sha1": e["hashes"].get("sha1"),
            "archive": e["archive"], "filename": e["filename"], "urls": tuple(e["urls"]),
            "preprocessing": e["preprocessing"], "split": (e["val_fraction"], e["test_fraction"])}


def test_the_registry_pins_the_published_figures():
    assert published("enwik8") == {
        "size": 100_000_000, "md5": "a1fa5ffddb56f4953e226637dabbb36a",
        "sha1": "57b8363b814821dc9d47aa4d41f58733519076b2", "archive": "enwik8.zip",
        "filename": "enwik8", "urls": ("http://mattmahoney.net/dc/enwik8.zip",),
        "preprocessing": "bytes", "split": (0.05, 0.05)}
    assert published("text8") == {
        "size": 100_000_000, "md5": "3bea1919949baf155f99411df5fada7e", "sha1": None,
        "archive": "text8.zip", "filename": "text8",
        "urls": ("http://mattmahoney.net/dc/text8.zip",), "preprocessing": "raw",
        "split": (0.05, 0.05)}


@pytest.fixture
def small_enwik8(tmp_path, monkeypatch) -> dict:
    """A 60,000-byte 'enwik8' (XML-ish UTF-8 text), zipped as enwik8.zip in served/, and the
    registry's enwik8 entry pinned to it."""
    text = pydoc_text(tmp_path / "src.txt", 30_000).read_text("utf-8")
    body = ("<page>\n  <title>Übersicht – 概要</title>\n  <text>" + text).encode("utf-8")
    body = (body * 3)[:60_000]
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", body)
    e = dataclasses.replace(
        corpus.entry("enwik8"), size=len(body), md5=hashlib.md5(body).hexdigest(),
        sha1=hashlib.sha1(body).hexdigest())
    monkeypatch.setitem(corpus.registry(), "enwik8", e)
    return {"body": body, "served": served, "zip": served / "enwik8.zip", "entry": e}


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_unpacks_the_member_and_drops_the_archive(small_enwik8, http_server,
                                                          isolated_cache, monkeypatch):
    server = http_server(small_enwik8["served"])
    e = dataclasses.replace(small_enwik8["entry"], urls=(server.url("enwik8.zip"),))
    monkeypatch.setitem(corpus.registry(), "enwik8", e)
    path = corpus.fetch("enwik8", progress=False)
    assert path == isolated_cache / "enwik8"
    assert path.read_bytes() == small_enwik8["body"]
    assert cache_files(isolated_cache) == ["enwik8"]
    assert corpus.is_cached(e)
    assert corpus.fetch("enwik8") == path and len(server.seen) == 1  # cached: no second request


def test_two_fetches_at_once_unpack_the_archive_once(small_enwik8, http_server,
                                                    isolated_cache, monkeypatch):
    """Two `charlm train --corpus enwik8` started together: the second waits for the first to
    download *and* unpack, then takes the file; it never opens the zip the first one deletes.
    The first one's unpacking waits until the second is seen waiting for it."""
    from charlm.data import download as download_module

    server = http_server(small_enwik8["served"])
    e = dataclasses.replace(small_enwik8["entry"], urls=(server.url("enwik8.zip"),))
    monkeypatch.setitem(corpus.registry(), "enwik8", e)
    unpacking, waiting, told = threading.Event(), threading.Event(), []
    real_extract = archive.extract

    def slow_extract(*args, **kwargs):
        if not unpacking.is_set():  # the first fetch: let the second one arrive meanwhile
            unpacking.set()
            waiting.wait(5)
        return real_extract(*args, **kwargs)

    def record(message):
        told.append(message)
        waiting.set()

    monkeypatch.setattr(archive, "extract", slow_extract)
    monkeypatch.setattr(download_module, "warn", record)
    results, errors = [], []

    def fetch():
        try:
            results.append(corpus.fetch("enwik8", progress=False))
        except Exception as exc:  # reported below
            errors.append(exc)

    first, second = threading.Thread(target=fetch), threading.Thread(target=fetch)
    first.start()
    assert unpacking.wait(30)
    second.start()
    for t in (first, second):
        t.join(60)
    assert errors == []
    assert results == [isolated_cache / "enwik8"] * 2
    assert (isolated_cache / "enwik8").read_bytes() == small_enwik8["body"]
    assert cache_files(isolated_cache) == ["enwik8"]
    assert told == ["another process is downloading enwik8; waiting for it"]
    assert len(server.seen) == 1


def test_the_mirror_serves_the_archive(small_enwik8, monkeypatch, isolated_cache):
    monkeypatch.setenv("CHARLM_MIRROR", str(small_enwik8["served"]))
    result = invoke("data", "download", "enwik8")
    assert result.exit_code == 0, result.output
    assert (isolated_cache / "enwik8").read_bytes() == small_enwik8["body"]
    assert cache_files(isolated_cache) == ["enwik8"]


def test_a_damaged_archive_leaves_nothing(small_enwik8, monkeypatch, isolated_cache):
    data = bytearray(small_enwik8["zip"].read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the deflated member: a CRC or inflate error
    small_enwik8["zip"].write_bytes(bytes(data))
    monkeypatch.setenv("CHARLM_MIRROR", str(small_enwik8["served"]))
    with pytest.raises(CharlmError) as err:
        corpus.fetch("enwik8", progress=False)
    assert str(err.value).startswith(f"enwik8 in {isolated_cache / 'enwik8.zip'} is damaged (")
    assert str(err.value).endswith("); nothing was written")
    assert cache_files(isolated_cache) == []  # the damaged zip is gone too: the next try downloads


def test_a_member_that_is_not_the_corpus_is_refused(small_enwik8, tmp_path, isolated_cache):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("enwik8", small_enwik8["body"][:-1] + b"!")  # same size, one byte changed
        zf.writestr("readme.txt", "hi")
    result = invoke("data", "add", "enwik8", str(other))
    got = hashlib.sha1(small_enwik8["body"][:-1] + b"!").hexdigest()
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: enwik8 in {other} is not the expected enwik8: sha1 mismatch (got {got}, "
        f"expected {small_enwik8['entry'].sha1}); nothing was written\n")
    assert cache_files(isolated_cache) == []


def test_sizes_and_names_are_checked_before_anything_is_written(small_enwik8, tmp_path,
                                                                 isolated_cache):
    bomb = tmp_path / "bomb.zip"  # claims far more than enwik8's size: refused before unpacking
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", b"\0" * 5_000_000)
    n = len(small_enwik8["body"])
    with pytest.raises(CharlmError) as err:
        corpus.add("enwik8", bomb)
    assert str(err.value) == (f"enwik8 in {bomb} is not the expected enwik8: 5,000,000 bytes, "
                              f"expected {n:,}; nothing was written")
    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("text8", b"x")
    with pytest.raises(CharlmError) as err:
        corpus.add("enwik8", wrong)
    assert str(err.value) == (f"{wrong} holds no file named enwik8 (it holds: text8); "
                              "nothing was written")
    assert cache_files(isolated_cache) == []


def test_data_add_takes_the_zip_or_the_file_itself(small_enwik8, tmp_path, isolated_cache):
    result = invoke("data", "add", "enwik8", str(small_enwik8["zip"]))
    assert (result.exit_code, result.stdout) == (
        0, f"added enwik8: {isolated_cache / 'enwik8'} (checksum verified)\n")
    assert (isolated_cache / "enwik8").read_bytes() == small_enwik8["body"]
    (isolated_cache / "enwik8").unlink()
    plain = tmp_path / "enwik8"
    plain.write_bytes(small_enwik8["body"])
    assert invoke("data", "add", "enwik8", str(plain)).exit_code == 0
    assert cache_files(isolated_cache) == ["enwik8"]
    listing = json.loads(invoke("data", "list", "--json").stdout)
    row = next(r for r in listing["corpora"] if r["name"] == "enwik8")
    assert (row["status"], row["bytes"]) == ("yes", len(small_enwik8["body"]))


def test_a_write_that_fails_leaves_nothing(small_enwik8, tmp_path):
    """A real failing write: the unpacking process may write no file past 10,000 bytes
    (RLIMIT_FSIZE, as a full disk would stop it), so the member cannot be written."""
    cache = tmp_path / "cache"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n"
        "from charlm.data import archive\n"
        "from charlm.errors import CharlmError\n"
        "try:\n"
        f"    archive.extract({str(small_enwik8['zip'])!r}, 'enwik8', {str(cache / 'enwik8')!r})\n"
        "except CharlmError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.stdout == (f"cannot write {cache / 'enwik8'}: File too large; "
                           "nothing was written\n"), done.stderr
    assert cache_files(cache) == []
    assert small_enwik8["zip"].is_file()  # the archive given is never touched


def test_a_file_that_is_no_zip_is_refused(tmp_path):
    junk = tmp_path / "enwik8.zip"
    junk.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CharlmError) as err:
        archive.extract(junk, "enwik8", tmp_path / "out" / "enwik8")
    assert str(err.value).startswith(f"{junk} is not a readable zip archive (")
    assert not (tmp_path / "out").exists()


def test_train_on_enwik8_with_its_standard_split_and_eval_the_test_split(small_enwik8,
                                                                        tmp_path, monkeypatch):
    """`charlm train --corpus enwik8` end to end: bytes, 90/5/5 split; `eval perplexity --split
    test` evaluates the last 5% (the papers' test set), in bits per byte."""
    monkeypatch.setenv("CHARLM_MIRROR", str(small_enwik8["served"]))
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    run = tmp_path / "run"
    result = invoke("train", "--corpus", "enwik8", "--hidden", "16", "--layers", "1",
                    "--embed", "8", "--batch-size", "4", "--num-steps", "16", "--max-steps",
                    "6", "--eval-every", "3", "--out", str(run), "-q", "--json")
    assert result.exit_code == 0, result.output
    body = small_enwik8["body"]
    result = invoke("eval", "perplexity", "--checkpoint", str(run), "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n = len(body)
    test = body[n - round(0.05 * n) + 1:]  # the last 5%, less its first
    assert (report["unit"], report["bytes"]) == ("byte", len(test))
    assert report["characters"] == len(bytes(test).decode("utf-8", errors="replace"))
    from charlm.artifacts.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["preprocessing"] == "bytes"
    assert ckpt["corpus"]["splits"] == {"train": n - 2 * round(0.05 * n), "val": round(0.05 * n),
                                        "test": round(0.05 * n)}
    assert sorted(ord(t) for t in ckpt["vocab"]["tokens"][1:]) == list(range(1, 256))
