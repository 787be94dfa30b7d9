"""charlm.data.corpus: the registry, the cache folder, and load_corpus by name, file and URL."""

from __future__ import annotations

import hashlib
import tomllib
from importlib import resources

import pytest
from pydoc_data.topics import topics

from charlm.data import corpus
from charlm.data.corpus import CorpusText, cache_dir, corpus_names, load_corpus
from charlm.data.download import DownloadError
from charlm.errors import CharlmError, UsageError

TM_SHA256 = "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516"
TS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HINT = "set CHARLM_MIRROR to a mirror URL or directory, or add a copy you have with"


def dead_url(name: str) -> str:
    """The registry URL the autouse fixture points at a refused loopback port."""
    return corpus.entry(name).urls[0]


def test_registry_pins_the_reference_corpora():
    table = tomllib.loads(resources.files("charlm.data").joinpath("corpora.toml").read_text("utf-8"))
    assert corpus_names() == ["enwik8", "python-docs", "text8", "timemachine", "tinyshakespeare"]
    tm, ts = table["timemachine"], table["tinyshakespeare"]
    assert tm["urls"] == ["http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"]
    assert tm["hashes"] == {"sha1": "090b5e7e70c295757f55df93cb0a180b9691891a", "sha256": TM_SHA256}
    assert (tm["size"], tm["filename"], tm["preprocessing"], tm["sample_prefix"]) == (
        178_979, "timemachine.txt", "d2l", "time traveller"
    )
    assert ts["urls"] == [
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    ]
    assert ts["hashes"] == {"sha1": "04486597058d11dcc2c556b1d0433891eb639d2e", "sha256": TS_SHA256}
    assert (ts["size"], ts["filename"], ts["preprocessing"]) == (1_115_394, "tinyshakespeare.txt", "raw")
    assert corpus.entry("timemachine").sha256 == TM_SHA256
    assert corpus.entry("python-docs").builtin


def test_reference_files_match_their_registry_entries(shared_data):
    for name in ("timemachine", "tinyshakespeare"):
        e = corpus.entry(name)
        data = (shared_data / e.filename).read_bytes()
        assert len(data) == e.size
        assert hashlib.sha1(data).hexdigest() == e.sha1
        assert hashlib.sha256(data).hexdigest() == e.sha256


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARLM_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("CHARLM_DATA_DIR")
    assert cache_dir() == tmp_path / "xdg" / "charlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "charlm"


def test_python_docs_is_offline_and_built_from_pydoc_topics():
    c = load_corpus("python-docs")
    expected = "\n\n".join(topics[k].rstrip("\n") for k in sorted(topics)) + "\n"
    assert c == CorpusText("python-docs", expected, "raw", "The ", "pydoc_data.topics")
    assert 400_000 < len(c.text) < 600_000
    assert c.text.startswith(topics[sorted(topics)[0]].rstrip("\n") + "\n\n" + topics[sorted(topics)[1]][:20])


def test_local_files_are_read_and_joined_with_newlines(shared_data):
    tm, ts = shared_data / "timemachine.txt", shared_data / "tinyshakespeare.txt"
    one = load_corpus(texts=[tm])
    assert one == CorpusText("timemachine", tm.read_text("utf-8"), "raw", "The", str(tm))
    two = load_corpus(texts=[ts, tm])
    assert two.text == ts.read_text("utf-8") + "\n" + tm.read_text("utf-8")
    assert (two.name, two.sample_prefix, two.source) == (
        "tinyshakespeare+timemachine", "First", f"{ts}, {tm}"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "{p} does not exist; check the path"),
        (b"", "{p} is empty; give a file that holds some text"),
        (
            "caf\xe9 cr\xe8me".encode("latin-1"),
            "{p} is not UTF-8 text (byte 0xe9 at offset 3); convert it first, "
            "e.g. iconv -f latin1 -t utf-8 {p} > bad.utf8.txt",
        ),
        (
            "hello".encode("utf-16"),
            "{p} is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); "
            "give a UTF-8 text file",
        ),
    ],
    ids=["missing", "empty", "latin1", "utf16"],
)
def test_unusable_text_files_give_one_line_errors(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(CharlmError) as err:
        load_corpus(texts=[p])
    assert str(err.value) == message.format(p=p)


def test_a_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(CharlmError) as err:
        load_corpus(texts=[tmp_path])
    assert str(err.value) == f"{tmp_path} is a directory; give a UTF-8 text file"


def test_utf8_with_bom_and_non_ascii_text_is_kept(tmp_path):
    p = tmp_path / "u.txt"
    p.write_bytes("\ufeffÜber große Flüsse\n".encode("utf-8"))
    assert load_corpus(texts=[p]).text == "Über große Flüsse\n"


def test_sources_are_mutually_exclusive_and_names_are_checked(tmp_path):
    with pytest.raises(UsageError) as err:
        load_corpus("timemachine", texts=[tmp_path / "a.txt"])
    assert str(err.value) == "give one corpus source, not a corpus name and --text"
    assert err.value.exit_code == 2
    with pytest.raises(UsageError) as err:
        load_corpus(texts=[tmp_path / "a.txt"], url="http://127.0.0.1/a.txt")
    assert str(err.value) == "give one corpus source, not --text and --url"
    with pytest.raises(UsageError) as err:
        load_corpus("timemachin")
    assert str(err.value) == (
        "unknown corpus 'timemachin': choose one of enwik8, python-docs, text8, timemachine, tinyshakespeare, "
        "or give a text file or URL (did you mean timemachine?)"
    )


def test_named_corpus_downloads_via_mirror_url_once(shared_data, http_server, monkeypatch, isolated_cache):
    server = http_server(shared_data)
    monkeypatch.setenv("CHARLM_MIRROR", server.base + "/")
    c = load_corpus("tinyshakespeare")
    cached = isolated_cache / "tinyshakespeare.txt"
    assert c == CorpusText(
        "tinyshakespeare", (shared_data / "tinyshakespeare.txt").read_text("utf-8"), "raw", "ROMEO:",
        str(cached),
    )
    assert cached.read_bytes() == (shared_data / "tinyshakespeare.txt").read_bytes()
    assert load_corpus("tinyshakespeare") == c
    assert [r["path"] for r in server.seen] == ["/tinyshakespeare.txt"]  # the second load used the cache


def test_named_corpus_from_a_mirror_directory(shared_data, monkeypatch, isolated_cache):
    monkeypatch.setenv("CHARLM_MIRROR", str(shared_data))
    c = load_corpus("timemachine")
    assert (c.name, c.preprocessing, c.sample_prefix) == ("timemachine", "d2l", "time traveller")
    assert c.text == (shared_data / "timemachine.txt").read_text("utf-8")
    assert sorted(p.name for p in isolated_cache.iterdir()) == ["timemachine.txt"]


def test_corrupted_mirror_copy_is_rejected_and_nothing_cached(shared_data, monkeypatch, tmp_path, isolated_cache):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = (shared_data / "timemachine.txt").read_bytes().replace(b"Traveller", b"Traveler", 1)
    (mirror / "timemachine.txt").write_bytes(data)
    monkeypatch.setenv("CHARLM_MIRROR", str(mirror))
    with pytest.raises(DownloadError) as err:
        load_corpus("timemachine")
    got = hashlib.sha256(data).hexdigest()
    assert str(err.value) == (
        f"could not download timemachine.txt: {(mirror / 'timemachine.txt').as_uri()}: sha256 "
        f"mismatch (got {got}, expected {TM_SHA256}); {dead_url('timemachine')}: connection refused "
        f"(after 2 attempts); check that CHARLM_MIRROR ({mirror}) holds timemachine.txt, or add a "
        "copy you have with 'charlm data add timemachine FILE'"
    )
    assert list(isolated_cache.iterdir()) == []


def test_default_falls_back_to_python_docs_with_one_warning_line(monkeypatch, tmp_path, capsys, isolated_cache):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("CHARLM_MIRROR", str(empty))
    c = load_corpus()
    assert (c.name, c.source) == ("python-docs", "pydoc_data.topics")
    err = capsys.readouterr().err
    assert err == (
        "charlm: warning: timemachine is not cached and cannot be downloaded, so the built-in "
        "python-docs corpus is used instead: a model trained on it writes Python's "
        "documentation, not The Time Machine, whatever the prompt ('time traveller' too) "
        "(could not download timemachine.txt: "
        f"{(empty / 'timemachine.txt').as_uri()}: file not found; {dead_url('timemachine')}: "
        f"connection refused (after 2 attempts); check that CHARLM_MIRROR ({empty}) holds "
        "timemachine.txt, or add a copy you have with 'charlm data add timemachine FILE')\n"
    )
    assert list(isolated_cache.iterdir()) == []


def test_an_explicit_name_never_falls_back(capsys):
    with pytest.raises(DownloadError) as err:
        load_corpus("timemachine")
    assert str(err.value) == (
        f"could not download timemachine.txt: {dead_url('timemachine')}: connection refused "
        f"(after 2 attempts); {HINT} 'charlm data add timemachine FILE'"
    )
    assert capsys.readouterr().err == ""


def test_default_is_the_time_machine_once_added(shared_data, capsys, isolated_cache):
    corpus.add("timemachine", shared_data / "timemachine.txt")
    c = load_corpus()
    assert (c.name, c.source, len(c.text)) == ("timemachine", str(isolated_cache / "timemachine.txt"), 178_979)
    assert capsys.readouterr().err == ""


def test_add_rejects_a_wrong_file_and_writes_nothing(shared_data, isolated_cache):
    wrong = shared_data / "timemachine.txt"
    with pytest.raises(CharlmError) as err:
        corpus.add("tinyshakespeare", wrong)
    assert str(err.value) == (
        f"{wrong} is not the expected tinyshakespeare.txt: sha256 mismatch (got {TM_SHA256}, "
        f"expected {TS_SHA256}); nothing was written"
    )
    assert not isolated_cache.exists()  # not even the cache folder is created
    with pytest.raises(UsageError) as err:
        corpus.add("python-docs", wrong)
    assert str(err.value) == "python-docs is built into Python; there is nothing to add"


def test_a_tampered_cache_file_is_downloaded_again(shared_data, monkeypatch, isolated_cache):
    e = corpus.entry("timemachine")
    corpus.add("timemachine", shared_data / "timemachine.txt")
    cached = isolated_cache / "timemachine.txt"
    cached.write_bytes(b"not the time machine")
    assert not corpus.is_cached(e)
    monkeypatch.setenv("CHARLM_MIRROR", str(shared_data))
    assert load_corpus("timemachine").text == (shared_data / "timemachine.txt").read_text("utf-8")
    assert corpus.is_cached(e)


def test_url_corpus_is_cached_under_a_name_derived_from_the_url(shared_data, http_server, isolated_cache):
    server = http_server(shared_data)
    url = server.url("tinyshakespeare.txt")
    c = load_corpus(url=url, sha256=TS_SHA256)
    assert c == CorpusText(
        "tinyshakespeare.txt", (shared_data / "tinyshakespeare.txt").read_text("utf-8"), "raw", "First", url
    )
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert [p.name for p in (isolated_cache / "urls").iterdir()] == [f"{key}-tinyshakespeare.txt"]
    assert load_corpus(url=url).text == c.text
    assert len(server.seen) == 1


def test_url_corpus_with_a_wrong_sha256_is_not_cached(shared_data, http_server, isolated_cache):
    server = http_server(shared_data)
    url = server.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        load_corpus(url=url, sha256=TS_SHA256)
    assert str(err.value) == (  # the file's name, not the cache's internal one
        f"could not download timemachine.txt: {url}: sha256 mismatch (got {TM_SHA256}, "
        f"expected {TS_SHA256})"
    )
    assert list((isolated_cache / "urls").iterdir()) == []
    with pytest.raises(UsageError) as err:
        load_corpus(url="ftp://example.org/a.txt")
    assert str(err.value) == "--url takes an http, https or file URL, not 'ftp://example.org/a.txt'"
    with pytest.raises(UsageError) as err:
        load_corpus(sha256=TS_SHA256)
    assert str(err.value) == "--sha256 checks a --url download; give --url too"
    for short in ("abc", TS_SHA256[:-1], TS_SHA256[:-1] + "g"):
        with pytest.raises(UsageError) as err:
            load_corpus(url=url, sha256=short)
        assert str(err.value) == (
            f"--sha256 must be 64 hexadecimal digits (as sha256sum prints them), got {short!r}")
    assert len(server.seen) == 1  # refused before any download


def test_url_corpus_that_is_not_text_is_not_kept(http_server, tmp_path, isolated_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(bytes(range(256)))
    server = http_server(served)
    url = server.url("blob.bin")
    with pytest.raises(CharlmError) as err:
        load_corpus(url=url)
    assert str(err.value).startswith(f"the file at {url} is unusable: ")
    assert str(err.value).endswith("(it holds NUL bytes, like a binary or UTF-16 file); give a UTF-8 text file")
    assert list((isolated_cache / "urls").iterdir()) == []


# --- --preprocessing bytes: any byte but NUL, wherever it is ----------------------------------


@pytest.mark.parametrize("offset", [3, 100, 70_000])
def test_bytes_mode_takes_a_file_that_is_not_utf8_wherever_its_first_bad_byte_is(tmp_path,
                                                                                 offset):
    """The sample prompt (the first word) used to be read as strict UTF-8 from the first 64 KiB
    only: a bad byte at offset 100 was refused, one at 70,000 trained. Now bytes mode takes
    both; raw mode refuses both, with the same line."""
    from charlm.data.dataset import load_dataset

    data = bytearray((b"cafe au lait, " * 6_000)[:80_000])
    data[offset] = 0xFF
    p = tmp_path / "latin1.txt"
    p.write_bytes(bytes(data))
    ds = load_dataset(text=[str(p)], preprocessing="bytes")
    ids = [*ds.train.tolist(), *ds.val.tolist(), *ds.test.tolist()]
    assert ds.vocab.decode(ids).encode("latin-1") == bytes(data)
    first = "caf" if offset == 3 else "cafe"  # the first word, up to a byte that does not decode
    assert ds.default_prefix == corpus.locate_corpus(texts=[p]).sample_prefix == first
    for mode in ("raw", "d2l"):
        with pytest.raises(CharlmError) as err:
            load_dataset(text=[str(p)], preprocessing=mode)
        assert str(err.value) == (
            f"{p} is not UTF-8 text (byte 0xff at offset {offset}); convert it first, e.g. "
            f"iconv -f latin1 -t utf-8 {p} > latin1.utf8.txt")


def test_bytes_mode_keeps_a_url_file_that_is_not_utf8(http_server, tmp_path, isolated_cache):
    served = tmp_path / "served"
    served.mkdir()
    body = "na\xefve caf\xe9\n".encode("latin-1") * 10
    (served / "latin1.txt").write_bytes(body)
    url = http_server(served).url("latin1.txt")
    source = corpus.locate_corpus(url=url, preprocessing="bytes")
    assert (source.sample_prefix, source.files[0].read_bytes()) == ("na", body)
    with pytest.raises(CharlmError) as err:  # text modes refuse it, and drop it from the cache
        corpus.locate_corpus(url=url, preprocessing="raw")
    assert str(err.value) == (
        f"the file at {url} is unusable: {source.files[0]} is not UTF-8 text (byte 0xef at "
        f"offset 2); convert it first, e.g. iconv -f latin1 -t utf-8 {source.files[0]} > "
        f"{source.files[0].stem}.utf8.txt")
    assert list((isolated_cache / "urls").iterdir()) == []
