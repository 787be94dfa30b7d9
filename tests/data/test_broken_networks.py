"""Broken networks and hostile servers, against real loopback servers (http and https).

Each section is one class of failure: TLS, servers too slow or too large, two downloads of one
file at once, redirects and URLs that can never work, answers that are not the file (HTML), and
credentials in a URL. What must hold for every one: one line naming the URL and the cause, no
retry where trying again cannot help, the next URL (then the python-docs fallback) tried, and
nothing half-written left in the cache.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from charlm.data import corpus, transfer
from charlm.data.corpus import load_corpus
from charlm.data.download import DownloadError, download
from helpers import TINY, run_main

TM_SHA256 = "8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516"
TM_BYTES = 178_979
FAST = {"timeout": (2, 2), "backoff": 0.01, "progress": False}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem), made by the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return folder


def tls(certificate: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    return ctx


def served(tmp_path: Path, name: str, data: bytes) -> Path:
    folder = tmp_path / "served"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


# --- TLS ----------------------------------------------------------------------------------------


def test_an_untrusted_certificate_is_one_line_not_retried_and_the_next_url_works(
        certificate, shared_data, http_server, tmp_path):
    bad = http_server(shared_data, tls=tls(certificate))
    good = http_server(shared_data)
    dest = tmp_path / "cache" / "timemachine.txt"
    download([bad.url("timemachine.txt"), good.url("timemachine.txt")], dest, sha256=TM_SHA256,
             retries=3, **FAST)
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    with pytest.raises(DownloadError) as err:
        download([bad.url("timemachine.txt")], tmp_path / "other" / "timemachine.txt",
                 retries=3, **FAST)
    assert str(err.value) == (f"could not download timemachine.txt: {bad.url('timemachine.txt')}: "
                              "certificate verify failed (self-signed certificate)")
    assert bad.seen == [] and files_in(tmp_path / "other") == []  # no request ever got through


def test_an_https_mirror_that_speaks_plain_http_falls_back_to_the_registry_then_python_docs(
        shared_data, http_server, monkeypatch, capsys, isolated_cache):
    plain = http_server(shared_data)
    monkeypatch.setenv("CHARLM_MIRROR", plain.base.replace("http://", "https://"))
    e = corpus.registry()["timemachine"]
    monkeypatch.setitem(corpus.registry(), "timemachine",
                        type(e)(**{**e.__dict__, "urls": (plain.url("timemachine.txt"),)}))
    assert load_corpus().name == "timemachine"  # the registry's URL, after the mirror failed
    assert [r["path"] for r in plain.seen] == ["/timemachine.txt"]

    (isolated_cache / "timemachine.txt").unlink()
    monkeypatch.setitem(corpus.registry(), "timemachine", e)  # its URL: a refused port
    assert load_corpus().name == "python-docs"
    warning = capsys.readouterr().err
    mirror = plain.base.replace("http://", "https://") + "/timemachine.txt"
    assert warning.count("\n") == 1 and warning.startswith("charlm: warning: timemachine is not")
    assert f"{mirror}: TLS handshake failed (wrong version number);" in warning


# --- too slow, too long, too large ----------------------------------------------------------------


def test_a_trickling_server_fails_the_minimum_rate_and_the_next_url_is_tried(
        shared_data, http_server, tmp_path):
    slow = http_server(shared_data, "trickle")
    good = http_server(shared_data)
    dest = tmp_path / "cache" / "timemachine.txt"
    urls = [slow.url("timemachine.txt"), good.url("timemachine.txt")]
    download(urls, dest, sha256=TM_SHA256, min_rate=1000, rate_window=0.5, retries=3, **FAST)
    assert dest.read_bytes() == (shared_data / "timemachine.txt").read_bytes()
    assert len(slow.seen) == 1  # too slow is not retried
    with pytest.raises(DownloadError) as err:
        download(urls[:1], tmp_path / "other" / "timemachine.txt", min_rate=1000,
                 rate_window=0.5, **FAST)
    assert str(err.value).startswith(f"could not download timemachine.txt: {urls[0]}: too slow: ")
    assert str(err.value).endswith(" bytes/s over 0 s (the minimum is 1,000)") or \
        str(err.value).endswith(" bytes/s over 1 s (the minimum is 1,000)")
    # what came is kept for a later resume, as after a stall
    assert files_in(tmp_path / "other") == ["timemachine.txt.part"]


def test_the_download_deadline_ends_a_url_however_steady_its_trickle(
        shared_data, http_server, tmp_path):
    slow = http_server(shared_data, "trickle")
    url = slow.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "cache" / "timemachine.txt", deadline=0.5, min_rate=0,
                 retries=3, **FAST)
    assert str(err.value) == (f"could not download timemachine.txt: {url}: gave up after 0.5 s "
                              "(the download deadline)")
    assert len(slow.seen) == 1


def test_a_body_larger_than_the_known_size_is_refused_before_it_is_read(
        shared_data, http_server, tmp_path, isolated_cache, monkeypatch):
    big = (shared_data / "timemachine.txt").read_bytes() * 20  # 3.6 MB for a 178,979-byte file
    server = http_server(served(tmp_path, "timemachine.txt", big))
    monkeypatch.setenv("CHARLM_MIRROR", server.base)
    with pytest.raises(DownloadError) as err:
        load_corpus("timemachine")
    assert str(err.value).startswith(
        f"could not download timemachine.txt: {server.url('timemachine.txt')}: the server sent "
        f"more than the file's 178,979 bytes (it announced {len(big):,}); http://127.0.0.1:")
    assert files_in(isolated_cache) == []


def test_a_body_without_length_is_cut_at_the_known_size_or_the_url_limit(
        http_server, tmp_path, monkeypatch):
    server = http_server(tmp_path, "endless")
    url = server.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "a" / "timemachine.txt", sha256=TM_SHA256, size=TM_BYTES,
                 retries=3, **FAST)
    assert str(err.value) == (f"could not download timemachine.txt: {url}: the server sent more "
                              "than the file's 178,979 bytes")
    monkeypatch.setattr(transfer, "MAX_BYTES", 1 << 20)
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b" / "x.txt", **FAST)
    assert str(err.value) == (f"could not download x.txt: {url}: the file is larger than "
                              "1,048,576 bytes, the most charlm takes from a URL")
    assert files_in(tmp_path / "a") == files_in(tmp_path / "b") == []
    assert len(server.seen) == 2


# --- two downloads of one file at once ------------------------------------------------------------


@pytest.mark.slow
def test_two_downloads_of_one_file_at_once_fetch_it_once(tmp_path, http_server, capfd):
    text = b"the time traveller (for so it will be convenient to speak of him)\n"
    server = http_server(served(tmp_path, "tm.txt", text), "trickle")  # ~3.4 s
    dest = tmp_path / "cache" / "tm.txt"
    results, errors = [], []

    def fetch():
        try:
            results.append(download([server.url("tm.txt")], dest, **FAST))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [dest, dest]
    assert dest.read_bytes() == text
    assert len(server.seen) == 1  # the second waited, then took the file the first committed
    assert files_in(dest.parent) == ["tm.txt"]
    assert capfd.readouterr().err == (
        "charlm: warning: another process is downloading tm.txt; waiting for it\n")


# --- URLs and redirects that can never work -------------------------------------------------------


def test_a_redirect_loop_is_not_retried(shared_data, http_server, tmp_path):
    server = http_server(shared_data)
    server.httpd.redirects["/loop"] = "/loop"
    with pytest.raises(DownloadError) as err:
        download([server.url("loop")], tmp_path / "c" / "x.txt", retries=3, **FAST)
    assert str(err.value) == (f"could not download x.txt: {server.url('loop')}: too many "
                              "redirects (a redirect loop)")
    assert len(server.seen) == 31  # one attempt: the first request and requests' 30 redirects


def test_a_redirect_to_a_local_file_is_refused(shared_data, http_server, tmp_path):
    server = http_server(shared_data)
    server.httpd.redirects["/x.txt"] = "file:///etc/passwd"
    with pytest.raises(DownloadError) as err:
        download([server.url("x.txt")], tmp_path / "c" / "x.txt", retries=3, **FAST)
    assert str(err.value) == (f"could not download x.txt: {server.url('x.txt')}: redirected to "
                              "file:///etc/passwd, which is not an http(s) URL")
    assert len(server.seen) == 1 and files_in(tmp_path / "c") == []


def test_https_may_not_redirect_to_plain_http(certificate, shared_data, http_server, tmp_path,
                                              monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate / "cert.pem"))  # trusted here
    secure = http_server(shared_data, tls=tls(certificate))
    plain = http_server(shared_data)
    dest = tmp_path / "c" / "timemachine.txt"
    download([secure.url("timemachine.txt")], dest, sha256=TM_SHA256, **FAST)  # https works
    secure.httpd.redirects["/moved.txt"] = plain.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        download([secure.url("moved.txt")], tmp_path / "d" / "moved.txt", retries=3, **FAST)
    assert str(err.value) == (
        f"could not download moved.txt: {secure.url('moved.txt')}: redirected from https to "
        f"plain http ({plain.url('timemachine.txt')}); refused")
    assert plain.seen == []  # not even asked


def test_urls_that_cannot_be_fetched_are_not_retried(tmp_path):
    with pytest.raises(DownloadError) as err:
        download(["http:///x.txt"], tmp_path / "c" / "x.txt", retries=3, **FAST)
    assert str(err.value) == ("could not download x.txt: http:///x.txt: not a valid URL (Invalid "
                              "URL 'http:///x.txt': No host supplied)")
    with pytest.raises(Exception) as err:
        load_corpus(url="http://[::1/x.txt")
    assert str(err.value) == "--url takes an http, https or file URL, not 'http://[::1/x.txt'"


def test_a_url_with_a_very_long_file_name_is_cached_under_a_short_one(
        shared_data, http_server, tmp_path, isolated_cache):
    name = "t" * 300 + ".txt"  # longer than a file name may be: served under a short one
    server = http_server(served(tmp_path, "short.txt", b"a text with a very long name\n"))
    server.httpd.redirects["/" + name] = "/short.txt"
    assert load_corpus(url=server.url(name)).text == "a text with a very long name\n"
    (cached,) = (isolated_cache / "urls").iterdir()
    assert cached.name.endswith("-" + "t" * 100) and len(cached.name) == 117


# --- answers that are not the file ------------------------------------------------------------------


def test_an_html_page_is_not_cached_as_a_corpus(shared_data, http_server, isolated_cache):
    server = http_server(shared_data, "html")
    url = server.url("timemachine.txt")
    with pytest.raises(DownloadError) as err:
        load_corpus(url=url)
    assert str(err.value) == (f"could not download timemachine.txt: {url}: the server sent an "
                              "HTML page, not a text file (give the URL of the raw file)")
    assert files_in(isolated_cache / "urls") == [] and len(server.seen) == 1
    # a checksum says what the file is, whatever the server calls it
    assert load_corpus(url=url, sha256=TM_SHA256).name == "timemachine.txt"


# --- credentials in a URL ---------------------------------------------------------------------------


def test_credentials_in_a_url_are_used_but_never_written_or_shown(
        tmp_path, http_server, monkeypatch):
    from helpers import pydoc_text

    folder = tmp_path / "served"
    folder.mkdir()
    pydoc_text(folder / "notes.txt", 6000)
    server = http_server(folder)
    url = server.url("notes.txt").replace("://", "://alice:s3cret@")
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    run = tmp_path / "run"
    code, out, err = run_main(["train", "--url", url, *TINY, "--out", str(run)])
    assert code == 0, err
    assert server.seen[0]["auth"] == "Basic YWxpY2U6czNjcmV0"  # alice:s3cret, sent
    written = [p for p in (tmp_path / "runs").rglob("*")] + list(run.iterdir())
    for path in written:
        if path.is_file():
            assert b"s3cret" not in path.read_bytes() and b"alice" not in path.read_bytes(), path
    assert "s3cret" not in out + err
    # the run resumes from the cache (keyed by the URL without its credentials), given it or not
    for extra, steps in (([], "25"), (["--url", url], "30")):
        code, _, err = run_main(["train", "--resume", str(run), *extra, "--max-steps", steps, "-q"])
        assert code == 0, err
    assert len(server.seen) == 1
    # and a failure names the URL without them
    code, _, err = run_main(["train", "--url", url.replace("notes", "gone"), *TINY,
                             "--out", str(tmp_path / "run2")])
    assert code == 1 and "s3cret" not in err and "alice" not in err
    assert f"{server.url('gone.txt')}: HTTP 404 Not Found" in err
