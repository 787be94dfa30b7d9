"""charlm.data.download against real loopback HTTP servers and real bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from charlm.data.download import DownloadError, download, install, mirror_urls

TM_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TM_SHA256 = "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516"
TM_BYTES = 178_979
FAST = {"timeout": (2, 0.3), "backoff": 0.01, "progress": False}


def fetch(urls, dest, **kw):
    return download(urls, dest, sha1=TM_SHA1, sha256=TM_SHA256, **{**FAST, **kw})


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_verifies_checksums_and_lands_in_the_cache(shared_data, http_server, tmp_path):
    server = http_server(shared_data)
    dest = tmp_path / "cache" / "timemachine.txt"
    assert fetch([server.url("timemachine.txt")], dest) == dest
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    assert files_in(dest.parent) == ["timemachine.txt"]
    assert server.seen == [{"path": "/timemachine.txt", "range": None, "status": 200}]


def test_corrupted_copy_is_rejected_and_nothing_is_cached(shared_data, http_server, tmp_path):
    data = bytearray((shared_data / "timemachine.txt").read_bytes())
    data[1000] ^= 0x20  # one flipped bit
    served = tmp_path / "served"
    served.mkdir()
    (served / "timemachine.txt").write_bytes(data)
    server = http_server(served)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        fetch([server.url("timemachine.txt")], cache / "timemachine.txt", retries=3)
    got = hashlib.sha256(data).hexdigest()
    assert str(err.value) == (
        f"could not download timemachine.txt: {server.url('timemachine.txt')}: "
        f"sha256 mismatch (got {got}, expected {TM_SHA256})"
    )
    assert files_in(cache) == []
    assert len(server.seen) == 1  # a mismatch of a fresh download is not retried


def test_http_404_is_one_line_and_not_retried(shared_data, http_server, tmp_path):
    server = http_server(shared_data)
    url = server.url("no-such-file.txt")
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "cache" / "timemachine.txt", retries=3)
    assert str(err.value) == f"could not download timemachine.txt: {url}: HTTP 404 Not Found"
    assert files_in(tmp_path / "cache") == []
    assert len(server.seen) == 1


def test_refused_connection_is_retried_then_reported(refused_url, tmp_path):
    url = f"{refused_url}/timemachine.txt"
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "cache" / "timemachine.txt", retries=2)
    assert str(err.value) == (
        f"could not download timemachine.txt: {url}: connection refused (after 3 attempts)"
    )
    assert files_in(tmp_path / "cache") == []


def test_server_that_stalls_before_answering_times_out(shared_data, http_server, tmp_path):
    server = http_server(shared_data, "stall")
    url = server.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "cache" / "timemachine.txt", retries=0)
    assert str(err.value) == (
        f"could not download timemachine.txt: {url}: server stalled (no data for 0.3 s)"
    )
    assert files_in(tmp_path / "cache") == []


def test_stall_mid_body_keeps_the_bytes_received_for_a_resume(shared_data, http_server, tmp_path):
    server = http_server(shared_data, "stall_mid_body")
    url = server.url("timemachine.txt")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        fetch([url], cache / "timemachine.txt", retries=0)
    assert str(err.value) == (
        f"could not download timemachine.txt: {url}: server stalled (no data for 0.3 s)"
    )
    assert files_in(cache) == ["timemachine.txt.part"]
    assert (cache / "timemachine.txt.part").stat().st_size == 1000


def test_mid_body_close_is_retried_and_the_next_download_resumes(shared_data, http_server, tmp_path):
    half = TM_BYTES // 2
    broken = http_server(shared_data, "close_mid_body")
    url = broken.url("timemachine.txt")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as err:
        fetch([url], cache / "timemachine.txt", retries=1)
    assert str(err.value) == (
        f"could not download timemachine.txt: {url}: "
        f"connection closed after {half:,} of {TM_BYTES:,} bytes (after 2 attempts)"
    )
    # The retry asked to resume; this server answered 200, so it started again from zero.
    assert [r["range"] for r in broken.seen] == [None, f"bytes={half}-"]
    # Documented: only a transfer broken off mid-body leaves its .part, and no final file.
    assert files_in(cache) == ["timemachine.txt.part"]
    assert (cache / "timemachine.txt.part").read_bytes() == (
        (shared_data / "timemachine.txt").read_bytes()[:half]
    )

    good = http_server(shared_data)
    fetch([good.url("timemachine.txt")], cache / "timemachine.txt")
    assert good.seen == [{"path": "/timemachine.txt", "range": f"bytes={half}-", "status": 206}]
    assert (cache / "timemachine.txt").read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    assert files_in(cache) == ["timemachine.txt"]


def test_half_downloaded_part_file_is_resumed_with_a_range_request(shared_data, http_server, tmp_path):
    original = (shared_data / "timemachine.txt").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt.part").write_bytes(original[:100_000])
    server = http_server(shared_data)
    fetch([server.url("timemachine.txt")], cache / "timemachine.txt")
    assert server.seen == [{"path": "/timemachine.txt", "range": "bytes=100000-", "status": 206}]
    assert (cache / "timemachine.txt").read_bytes() == original
    assert files_in(cache) == ["timemachine.txt"]


def test_server_without_range_support_restarts_from_zero(shared_data, http_server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt.part").write_bytes(b"x" * 5000)
    server = http_server(shared_data, "norange")
    fetch([server.url("timemachine.txt")], cache / "timemachine.txt")
    assert server.seen == [{"path": "/timemachine.txt", "range": "bytes=5000-", "status": 200}]
    assert (cache / "timemachine.txt").read_bytes() == (shared_data / "timemachine.txt").read_bytes()


def test_stale_part_file_that_fails_the_checksum_is_fetched_again_whole(
    shared_data, http_server, tmp_path
):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt.part").write_bytes(b"x" * 5000)  # not the file's first bytes
    server = http_server(shared_data)
    fetch([server.url("timemachine.txt")], cache / "timemachine.txt", retries=1)
    assert [(r["range"], r["status"]) for r in server.seen] == [("bytes=5000-", 206), (None, 200)]
    assert (cache / "timemachine.txt").read_bytes() == (shared_data / "timemachine.txt").read_bytes()


def test_part_file_longer_than_the_file_starts_again(shared_data, http_server, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt.part").write_bytes(b"x" * (TM_BYTES + 10))
    server = http_server(shared_data)
    fetch([server.url("timemachine.txt")], cache / "timemachine.txt", retries=0)
    assert [r["range"] for r in server.seen] == [f"bytes={TM_BYTES + 10}-", None]
    assert (cache / "timemachine.txt").read_bytes() == (shared_data / "timemachine.txt").read_bytes()


def test_next_url_is_tried_after_one_fails(shared_data, http_server, refused_url, tmp_path):
    server = http_server(shared_data)
    dest = tmp_path / "cache" / "timemachine.txt"
    fetch([f"{refused_url}/timemachine.txt", server.url("timemachine.txt")], dest)
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()


def test_file_urls_are_copied_and_verified(shared_data, tmp_path):
    dest = tmp_path / "cache" / "timemachine.txt"
    fetch([(shared_data / "timemachine.txt").as_uri()], dest)
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    missing = (tmp_path / "nowhere" / "timemachine.txt").as_uri()
    with pytest.raises(DownloadError) as err:
        fetch([missing], tmp_path / "other" / "timemachine.txt")
    assert str(err.value) == f"could not download timemachine.txt: {missing}: file not found"


def test_mirror_urls_follow_charlm_mirror(monkeypatch, tmp_path):
    assert mirror_urls("timemachine.txt") == []
    monkeypatch.setenv("CHARLM_MIRROR", "https://example.org/corpora/")
    assert mirror_urls("timemachine.txt") == ["https://example.org/corpora/timemachine.txt"]
    monkeypatch.setenv("CHARLM_MIRROR", str(tmp_path))
    assert mirror_urls("timemachine.txt") == [(tmp_path / "timemachine.txt").as_uri()]


def test_install_copies_only_a_matching_file(shared_data, tmp_path):
    dest = tmp_path / "cache" / "timemachine.txt"
    install(shared_data / "timemachine.txt", dest, sha1=TM_SHA1, sha256=TM_SHA256)
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    wrong = shared_data / "tinyshakespeare.txt"
    other = tmp_path / "other" / "timemachine.txt"
    with pytest.raises(Exception) as err:
        install(wrong, other, sha1=TM_SHA1, sha256=TM_SHA256)
    got = hashlib.sha256(wrong.read_bytes()).hexdigest()
    assert str(err.value) == (
        f"{wrong} is not the expected timemachine.txt: sha256 mismatch (got {got}, "
        f"expected {TM_SHA256}); nothing was written"
    )
    assert files_in(other.parent) == []


def test_unknown_host_is_reported_at_once_without_retries(monkeypatch, tmp_path):
    import socket

    calls = []

    def no_dns(host, *args, **kwargs):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    url = "http://corpora.invalid/timemachine.txt"
    with pytest.raises(DownloadError) as err:
        fetch([url], tmp_path / "cache" / "timemachine.txt", retries=3)
    assert str(err.value) == (
        f"could not download timemachine.txt: {url}: cannot resolve host corpora.invalid"
    )
    assert calls == ["corpora.invalid"]
