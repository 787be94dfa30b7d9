"""Fetch one file into the cache: resumable, retried, checksum-verified, moved in atomically.

On disk, while a download runs (dest = <cache>/timemachine.txt):

    <cache>/timemachine.txt.part   bytes received so far; a retry or a later run resumes it
                                   with `Range: bytes=N-` (206 -> append, 200 -> start again)
    <cache>/timemachine.txt        appears only by os.replace, after every given checksum matched

What a failure leaves behind: nothing, except a `.part` holding the bytes of a transfer that broke
off mid-body (connection closed or stalled) after all retries, so that the next run resumes it.
A checksum mismatch deletes the `.part`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import requests
import urllib3.exceptions
from tqdm import tqdm

from charlm import __version__
from charlm.errors import CharlmError

CHUNK = 1 << 16
_HEADERS = {
    "User-Agent": f"charlm/{__version__}",
    # Byte ranges and Content-Length must count the file's own bytes, not a gzip encoding of them.
    "Accept-Encoding": "identity",
}


class DownloadError(CharlmError):
    """Every source of a file failed; the message names each URL and why."""


class _Failed(Exception):
    """One attempt at one URL failed; `retry` says whether trying that URL again may help."""

    def __init__(self, cause: str, retry: bool):
        super().__init__(cause)
        self.cause = cause
        self.retry = retry


def file_digests(path: Path) -> dict[str, str]:
    """md5, sha1 and sha256 of a file, hex."""
    hashes = {"md5": hashlib.md5(), "sha1": hashlib.sha1(), "sha256": hashlib.sha256()}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def checksum_mismatch(path: Path, *, sha1: str | None = None, sha256: str | None = None,
                      md5: str | None = None) -> str | None:
    """None when every given checksum matches `path`, else e.g. 'sha256 mismatch (got .., expected ..)'."""
    expected = {"sha256": sha256, "sha1": sha1, "md5": md5}
    if not any(expected.values()):
        return None
    got = file_digests(path)
    for name, want in expected.items():
        if want and got[name] != want.lower():
            return f"{name} mismatch (got {got[name]}, expected {want.lower()})"
    return None


def mirror_urls(filename: str) -> list[str]:
    """Where CHARLM_MIRROR (a base URL or a local directory) would hold `filename`; [] if unset."""
    mirror = os.environ.get("CHARLM_MIRROR", "").strip()
    if not mirror:
        return []
    if "://" in mirror:
        return [mirror.rstrip("/") + "/" + filename]
    return [(Path(mirror).expanduser().resolve() / filename).as_uri()]


def _commit(part: Path, dest: Path, sha1: str | None, sha256: str | None, retry: bool) -> None:
    """Move a finished `.part` into place if its checksums match; delete it if they do not."""
    mismatch = checksum_mismatch(part, sha1=sha1, sha256=sha256)
    if mismatch:
        part.unlink(missing_ok=True)
        raise _Failed(mismatch, retry=retry)
    os.replace(part, dest)


def _copy_local(url: str, part: Path) -> None:
    src = Path(urllib.request.url2pathname(urlparse(url).path))
    if not src.is_file():
        raise _Failed("file not found", retry=False)
    with open(src, "rb") as fin, open(part, "wb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _chain(exc: BaseException):
    """The exception and everything it wraps (requests -> urllib3 -> socket errors)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
        todo += [a for a in e.args if isinstance(a, BaseException)]


def _network_failure(exc: Exception, url: str, timeout: tuple[float, float]) -> _Failed:
    """What went wrong with the network, in a few words, and whether to try again."""
    chain = list(_chain(exc))
    if isinstance(exc, requests.ConnectTimeout):
        return _Failed(f"no connection within {timeout[0]:g} s (connect timeout)", retry=True)
    if any(isinstance(e, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for e in chain):
        return _Failed(f"server stalled (no data for {timeout[1]:g} s)", retry=True)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return _Failed("connection refused", retry=True)
    if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in chain):
        # Offline machines fail here at once; waiting and asking again only delays the fallback.
        return _Failed(f"cannot resolve host {urlparse(url).hostname}", retry=False)
    for e in reversed(chain):
        if isinstance(e, OSError) and e.strerror:
            return _Failed(e.strerror.lower(), retry=True)
    return _Failed(f"{type(exc).__name__}: {exc}", retry=True)


def _start(response: requests.Response, offset: int) -> int | None:
    """Where the body starts in the file: 0 for a 200, `offset` for a 206 that resumes; else None."""
    if response.status_code == 200:
        return 0
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        if content_range.startswith(f"bytes {offset}-"):
            return offset
    return None


def _fetch_http(
    session: requests.Session, url: str, part: Path, timeout: tuple[float, float], show: bool
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    total = None
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
            start = _start(r, offset)
            if offset and start is None and r.status_code in (206, 416):
                # The server cannot continue our .part (a range we did not ask for, or one past
                # its end): start again from zero.
                part.unlink()
                return _fetch_http(session, url, part, timeout, show)
            if start is None:
                transient = r.status_code >= 500 or r.status_code in (408, 429)
                raise _Failed(f"HTTP {r.status_code} {r.reason}".rstrip(), retry=transient)
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and r.headers.get("Content-Encoding", "identity") == "identity":
                total = start + int(length)
            bar = tqdm(
                total=total, initial=start, desc=part.name.removesuffix(".part"), unit="B",
                unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr,
                disable=not show,
            )
            # read1 hands over whatever has arrived, so a transfer that breaks off keeps every
            # byte it received (iter_content would drop a partly filled chunk).
            read = getattr(r.raw, "read1", r.raw.read)
            with open(part, "ab" if start else "wb") as f, bar:
                try:
                    while chunk := read(CHUNK, decode_content=True):
                        f.write(chunk)
                        bar.update(len(chunk))
                finally:
                    f.flush()
                    os.fsync(f.fileno())
    except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
        got = part.stat().st_size if part.exists() else 0
        of = f" of {total:,}" if total is not None else ""
        raise _Failed(f"connection closed after {got:,}{of} bytes", retry=True) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise _network_failure(exc, url, timeout) from None
    received = part.stat().st_size
    if total is not None and received != total:
        raise _Failed(f"connection closed after {received:,} of {total:,} bytes", retry=True)


def download(
    urls: list[str],
    dest: Path,
    *,
    sha1: str | None = None,
    sha256: str | None = None,
    timeout: tuple[float, float] = (10, 30),
    retries: int = 3,
    backoff: float = 0.5,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Fetch `dest` from the first of `urls` that works (http, https or file) and return `dest`.

    Each URL gets 1 + `retries` attempts for transient failures (refused or broken connections,
    timeouts, HTTP 5xx, 408, 429), `backoff` * 2**k seconds apart; an unknown host, another HTTP
    error or a checksum mismatch moves on to the next URL at once. `timeout` is (connect, read) in seconds. `name` names the file in messages
    (default: dest's name). Raises DownloadError.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    show = progress and sys.stderr.isatty()
    failures: list[str] = []
    with requests.Session() as session:
        session.headers.update(_HEADERS)
        for url in urls:
            scheme = urlparse(url).scheme
            attempts = 0
            while True:
                attempts += 1
                resumed = scheme != "file" and part.exists() and part.stat().st_size > 0
                try:
                    if scheme == "file":
                        _copy_local(url, part)
                    elif scheme in ("http", "https"):
                        _fetch_http(session, url, part, timeout, show)
                    else:
                        raise _Failed(f"unsupported URL scheme {scheme!r}", retry=False)
                    # A mismatch after resuming may be the old .part's fault (it is deleted):
                    # then a fresh attempt from zero settles it.
                    _commit(part, dest, sha1, sha256, retry=resumed)
                    return dest
                except _Failed as failed:
                    if not failed.retry or attempts > retries:
                        times = f" (after {attempts} attempts)" if attempts > 1 else ""
                        failures.append(f"{url}: {failed.cause}{times}")
                        break
                    time.sleep(backoff * 2 ** (attempts - 1))
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    raise DownloadError(f"could not download {name or dest.name}: "
                        + ("; ".join(failures) or "no URL given"))


def install(src: Path, dest: Path, *, sha1: str | None = None, sha256: str | None = None) -> Path:
    """Copy a local file to `dest` atomically, only if its checksums match; raise CharlmError if not."""
    mismatch = checksum_mismatch(Path(src), sha1=sha1, sha256=sha256)
    if mismatch:  # checked before anything (even the cache folder) is created
        raise CharlmError(f"{src} is not the expected {dest.name}: {mismatch}; nothing was written")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        _copy_local(Path(src).resolve().as_uri(), tmp)
        _commit(tmp, dest, sha1, sha256, retry=False)
    except _Failed as failed:
        raise CharlmError(
            f"{src} is not the expected {dest.name}: {failed.cause}; nothing was written"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest
