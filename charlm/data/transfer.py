"""One transfer from one URL into a `.part` file, and what it may cost (see charlm.data.download).

    Bounds     bytes: the file's known size, else MAX_BYTES; time: a deadline over every attempt
               at the URL; pace: at least `min_rate` bytes/s over each `window` seconds
    Session    follows redirects to http(s) only, and never from https down to http
    fetch_http one GET (resuming a `.part` with Range), refusing an HTML page where no checksum
               says what the file is; every failure becomes a `Failed(cause, retry)`

Failures that come back the same however often they are tried (a TLS handshake, a bad or looping
redirect, an invalid URL, an unknown host, a file too large or a server too slow) are not retried.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from tqdm import tqdm

from charlm.about import __version__
from charlm.text_safety import shown

CHUNK = 1 << 16
MAX_BYTES = 2 << 30  # a file of unknown size: no character-level corpus is larger (enwik9: 1e9)
HEADERS = {
    "User-Agent": f"charlm/{__version__}",
    # Byte ranges and Content-Length must count the file's own bytes, not a gzip encoding of them.
    "Accept-Encoding": "identity",
}
_HTML = ("text/html", "application/xhtml+xml")


class Failed(Exception):
    """One attempt at one URL failed; `retry` says whether trying that URL again may help."""

    def __init__(self, cause: str, retry: bool):
        super().__init__(cause)
        self.cause = cause
        self.retry = retry


def public_url(url: str) -> str:
    """`url` without the user name and password it may carry (for messages, configs, checkpoints)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class Bounds:
    """What one URL may cost: its bytes (`limit`: the known size, else MAX_BYTES), its time (a
    deadline over every attempt) and its pace (`min_rate` bytes/s over each `window` seconds)."""

    def __init__(self, size: int | None, deadline: float, min_rate: float, window: float,
                 refuse_html: bool):
        self.size, self.limit = size, size if size else MAX_BYTES
        self.deadline, self.min_rate, self.window = deadline, min_rate, window
        self.refuse_html = refuse_html
        self.ends = time.monotonic() + deadline if deadline else None

    def too_big(self) -> str:
        if self.size:
            return f"the server sent more than the file's {self.size:,} bytes"
        return (f"the file is larger than {self.limit:,} bytes, the most charlm takes from a "
                "URL")

    def check_time(self) -> None:
        if self.ends is not None and time.monotonic() > self.ends:
            raise Failed(f"gave up after {self.deadline:g} s (the download deadline)", retry=False)

    def pace(self):
        """A function to call with each chunk's size: it fails the attempt when too slow."""
        start, got = time.monotonic(), 0

        def add(n: int) -> None:
            nonlocal start, got
            got += n
            now = time.monotonic()
            self.check_time()
            if now - start >= self.window:
                rate = got / (now - start)
                if rate < self.min_rate:
                    raise Failed(f"too slow: {rate:,.0f} bytes/s over {now - start:.0f} s "
                                  f"(the minimum is {self.min_rate:,.0f})", retry=False)
                start, got = now, 0

        return add if self.min_rate else lambda n: self.check_time()


def _chain(exc: BaseException):
    """The exception and everything it wraps (requests -> urllib3 -> ssl / socket errors)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue  # ssl.SSLError.reason, for one, is a string
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
        todo += [a for a in e.args if isinstance(a, BaseException)]


_PERMANENT = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
              requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader,
              requests.exceptions.URLRequired, urllib3.exceptions.LocationParseError)


def _network_failure(exc: Exception, url: str, timeout: tuple[float, float]) -> Failed:
    """What went wrong with the network, in a few words, and whether to try again."""
    chain = list(_chain(exc))
    if isinstance(exc, requests.TooManyRedirects):
        return Failed("too many redirects (a redirect loop)", retry=False)
    if any(isinstance(e, _PERMANENT) for e in chain):
        return Failed(f"not a valid URL ({shown(str(exc).splitlines()[0]) if str(exc) else '?'})",
                       retry=False)
    for e in chain:  # a handshake fails the same way every time: no retries
        if isinstance(e, ssl.SSLCertVerificationError):
            why = e.verify_message or e.reason or "unknown reason"
            return Failed(f"certificate verify failed ({shown(why)})", retry=False)
    for e in chain:
        if isinstance(e, ssl.SSLError):
            why = (e.reason or str(e)).lower().replace("_", " ")
            return Failed(f"TLS handshake failed ({shown(why)})", retry=False)
    if isinstance(exc, requests.ConnectTimeout):
        return Failed(f"no connection within {timeout[0]:g} s (connect timeout)", retry=True)
    if any(isinstance(e, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for e in chain):
        return Failed(f"server stalled (no data for {timeout[1]:g} s)", retry=True)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return Failed("connection refused", retry=True)
    if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in chain):
        # Offline machines fail here at once; waiting and asking again only delays the fallback.
        return Failed(f"cannot resolve host {urlparse(url).hostname}", retry=False)
    for e in reversed(chain):
        if isinstance(e, OSError) and e.strerror:
            return Failed(shown(e.strerror.lower()), retry=True)
    return Failed(f"{type(exc).__name__}: {shown(public_url(str(exc)))}", retry=True)


class Session(requests.Session):
    """A session that follows redirects only to http(s), and never from https down to http."""

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target:
            new = urljoin(resp.url, target)
            scheme = urlparse(new).scheme.lower()
            if scheme not in ("http", "https"):
                raise Failed(f"redirected to {shown(public_url(new))}, which is not an http(s) URL",
                              retry=False)
            if urlparse(resp.url).scheme.lower() == "https" and scheme == "http":
                raise Failed(f"redirected from https to plain http ({shown(public_url(new))}); "
                              "refused", retry=False)
        return target


def _start(response: requests.Response, offset: int) -> int | None:
    """Where the body starts in the file: 0 for a 200, `offset` for a 206 that resumes; else None."""
    if response.status_code == 200:
        return 0
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        if content_range.startswith(f"bytes {offset}-"):
            return offset
    return None


def fetch_http(session: requests.Session, url: str, part: Path, timeout: tuple[float, float],
                show: bool, bounds: Bounds) -> None:
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
                return fetch_http(session, url, part, timeout, show, bounds)
            if start is None:
                transient = r.status_code >= 500 or r.status_code in (408, 429)
                raise Failed(f"HTTP {r.status_code} {shown(r.reason or '')}".rstrip(), retry=transient)
            kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if bounds.refuse_html and kind in _HTML:
                raise Failed("the server sent an HTML page, not a text file (give the URL of "
                              "the raw file)", retry=False)
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and r.headers.get("Content-Encoding", "identity") == "identity":
                total = start + int(length)
                if total > bounds.limit:
                    part.unlink(missing_ok=True)
                    raise Failed(f"{bounds.too_big()} (it announced {total:,})", retry=False)
            bar = tqdm(
                total=total, initial=start, desc=part.name.removesuffix(".part"), unit="B",
                unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr,
                disable=not show,
            )
            # read1 hands over whatever has arrived, so a transfer that breaks off keeps every
            # byte it received (iter_content would drop a partly filled chunk).
            read = getattr(r.raw, "read1", r.raw.read)
            pace, received = bounds.pace(), start
            with open(part, "ab" if start else "wb") as f, bar:
                try:
                    while chunk := read(CHUNK, decode_content=True):
                        received += len(chunk)
                        if received > bounds.limit:
                            f.truncate(0)  # garbage: the .part goes below
                            raise Failed(bounds.too_big(), retry=False)
                        f.write(chunk)
                        bar.update(len(chunk))
                        pace(len(chunk))
                finally:
                    f.flush()
                    os.fsync(f.fileno())
    except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError):
        got = part.stat().st_size if part.exists() else 0
        of = f" of {total:,}" if total is not None else ""
        raise Failed(f"connection closed after {got:,}{of} bytes", retry=True) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise _network_failure(exc, url, timeout) from None
    except Failed as failed:
        if not failed.retry and part.exists() and part.stat().st_size == 0:
            part.unlink()
        raise
    received = part.stat().st_size
    if total is not None and received != total:
        raise Failed(f"connection closed after {received:,} of {total:,} bytes", retry=True)
