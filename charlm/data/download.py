"""Fetch one file into the cache: resumable, retried, bounded, checksum-verified, moved in atomically.

On disk, while a download runs (dest = <cache>/timemachine.txt):

    <cache>/.timemachine.txt.lock  held (flock) by the one process downloading this file; a
                                   second one waits, then finds the file in place; removed after
    <cache>/timemachine.txt.part   bytes received so far; a retry or a later run resumes it
                                   with `Range: bytes=N-` (206 -> append, 200 -> start again)
    <cache>/timemachine.txt        appears only by os.replace, after every given checksum matched

What a failure leaves behind: nothing, except a `.part` holding the bytes of a transfer that broke
off mid-body (connection closed, stalled or too slow) after all retries, so that the next run
resumes it. A checksum mismatch or a body larger than the file can be deletes the `.part`.

What a server cannot do: send more than the file's known size (or MAX_BYTES when it is unknown),
keep one URL busy past `deadline` seconds, or trickle below `min_rate` bytes/s (averaged over
`rate_window` seconds); redirect https to http or to anything but http(s); pass off an HTML page
as a text file whose checksum is unknown. Credentials in a URL (`https://user:pw@host/...`) are
used for the request and never shown: messages name `public_url(url)`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from charlm.data.transfer import (
    HEADERS,
    Bounds,
    Failed,
    Session,
    fetch_http,
    public_url,
)
from charlm.errors import CharlmError, warn
from charlm.system.files import TooLong, atomic_copy

NOTHING = "nothing was written"  # how a failed copy into the cache ends its message

DEADLINE_S = 1800.0  # per URL, every attempt included (the options' defaults)
MIN_RATE = 1024  # bytes/s, over RATE_WINDOW_S
RATE_WINDOW_S = 30.0


class DownloadError(CharlmError):
    """Every source of a file failed; the message names each URL and why."""


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
        raise Failed(mismatch, retry=retry)
    os.replace(part, dest)


def _copy_local(url: str, dest: Path, sha1: str | None, sha256: str | None,
                bounds: Bounds | None = None) -> None:
    """A file:// URL copied straight to `dest` (`atomic_copy`: a local copy needs no resumable
    `.part`), if its checksums match."""
    src = Path(urllib.request.url2pathname(urlparse(url).path))
    if not src.is_file():  # directories, devices, pipes: never read as a corpus
        raise Failed("file not found" if not src.exists() else "not a regular file", retry=False)
    if bounds is not None and src.stat().st_size > bounds.limit:
        raise Failed(bounds.too_big(), retry=False)

    def check(tmp: Path, copied: int) -> None:
        mismatch = checksum_mismatch(tmp, sha1=sha1, sha256=sha256)
        if mismatch:
            raise Failed(mismatch, retry=False)

    with open(src, "rb") as fin:
        try:
            atomic_copy(fin, dest, limit=None if bounds is None else bounds.limit, check=check,
                        kept=NOTHING)
        except TooLong:  # it grew since its size was read
            raise Failed(bounds.too_big(), retry=False) from None


@contextmanager
def exclusive(dest: Path):
    """Hold `.<dest>.lock` (flock): one process downloads a file, the others wait for it.
    The cache folder is created first if need be.

    The holder removes the lock file when done; a waiter that then gets the lock of a removed
    file tries again on the one now there, so two processes never hold "the" lock at once."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create the cache folder {dest.parent}: {exc.strerror}") from None
    lock = dest.with_name(f".{dest.name}.lock")
    told = False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise CharlmError(f"cannot write in {lock.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                warn(f"another process is downloading {dest.name}; waiting for it")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def download(
    urls: list[str],
    dest: Path,
    *,
    sha1: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    timeout: tuple[float, float] = (10, 30),
    deadline: float = DEADLINE_S,
    min_rate: float = MIN_RATE,
    rate_window: float = RATE_WINDOW_S,
    retries: int = 3,
    backoff: float = 0.5,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Fetch `dest` from the first of `urls` that works (http, https or file) and return `dest`.

    Each URL gets 1 + `retries` attempts for transient failures (refused or broken connections,
    timeouts, HTTP 5xx, 408, 429), `backoff` * 2**k seconds apart, all within `deadline` seconds
    (0: none); an unknown host, a TLS failure, another HTTP error, a bad redirect, a body over
    `size` bytes (the file's known size; else MAX_BYTES), a pace under `min_rate` bytes/s over
    `rate_window` seconds (0: any pace) or a checksum mismatch moves on to the next URL at once.
    `timeout` is (connect, read) in seconds. `name` names the file in messages
    (default: dest's name). Raises DownloadError, or CharlmError for a cache
    folder that cannot be written (no other URL would help, nor the python-docs fallback).
    """
    dest = Path(dest)
    show = progress and sys.stderr.isatty()
    with exclusive(dest):
        if dest.is_file() and checksum_mismatch(dest, sha1=sha1, sha256=sha256) is None:
            return dest  # another process fetched it while this one waited
        return _download(urls, dest, sha1, sha256, size, timeout, deadline, min_rate,
                         rate_window, retries, backoff, show, name)


def _download(urls, dest, sha1, sha256, size, timeout, deadline, min_rate, rate_window, retries,
              backoff, show, name=None) -> Path:
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    with Session() as session:
        session.headers.update(HEADERS)
        for url in urls:
            scheme = urlparse(url).scheme
            bounds = Bounds(size, deadline, min_rate, rate_window,
                             refuse_html=not (sha1 or sha256))
            attempts = 0
            while True:
                attempts += 1
                resumed = scheme != "file" and part.exists() and part.stat().st_size > 0
                try:
                    if scheme == "file":
                        _copy_local(url, dest, sha1, sha256, bounds)
                        return dest
                    elif scheme in ("http", "https"):
                        fetch_http(session, url, part, timeout, show, bounds)
                    else:
                        raise Failed(f"unsupported URL scheme {scheme!r}", retry=False)
                    # A mismatch after resuming may be the old .part's fault (it is deleted):
                    # then a fresh attempt from zero settles it.
                    _commit(part, dest, sha1, sha256, retry=resumed)
                    return dest
                except Failed as failed:
                    if not failed.retry or attempts > retries:
                        times = f" (after {attempts} attempts)" if attempts > 1 else ""
                        failures.append(f"{public_url(url)}: {failed.cause}{times}")
                        break
                    pause = backoff * 2 ** (attempts - 1)
                    if bounds.ends is not None and time.monotonic() + pause > bounds.ends:
                        failures.append(f"{public_url(url)}: {failed.cause} (then the download "
                                        f"deadline of {deadline:g} s came)")
                        break
                    time.sleep(pause)
                except OSError as exc:  # our own disk, not the network: no other URL helps
                    part.unlink(missing_ok=True)
                    raise CharlmError(f"could not download {name or dest.name}: cannot write "
                                      f"{exc.filename or part}: {exc.strerror or exc}") from None
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
    try:
        _copy_local(Path(src).resolve().as_uri(), dest, sha1, sha256)
    except Failed as failed:
        raise CharlmError(f"{src} is not the expected {dest.name}: {failed.cause}; {NOTHING}") \
            from None
    return dest
