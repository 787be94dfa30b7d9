"""Corpora published inside a zip archive (enwik8.zip holds enwik8): taking the file out of it.

On disk, in the cache (dest = <cache>/enwik8):

    <cache>/.enwik8.lock            held (flock) while the archive is downloaded and unpacked:
                                    a second process waits, then finds enwik8 in place
    <cache>/enwik8.zip              the downloaded archive (charlm.data.download), kept only
                                    until its member is out, so a failed unpack is retried
                                    without downloading again
    <cache>/.enwik8.<pid>.tmp       the member, streamed out of the archive block by block
    <cache>/enwik8                  appears only by os.replace, after its size and every
                                    pinned checksum matched

A failure (not a zip, no such member, a damaged archive, a full disk, a checksum mismatch)
is one CharlmError line that ends "nothing was written": the temp file is removed and the
cache holds what it held before. The size is checked against the archive's own listing before
anything is written, so a wrong (or hostile) archive cannot fill the disk.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from charlm.data.download import CHUNK, checksum_mismatch
from charlm.errors import CharlmError
from charlm.text_safety import shown


def _copy_checked(src: BinaryIO, dest: Path, what: str, size: int | None,
                  hashes: dict[str, str | None]) -> Path:
    """Stream `src` into a temp file beside `dest`, check it, move it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            copied = 0
            while block := src.read(CHUNK * 16):
                copied += len(block)
                if size is not None and copied > size:
                    raise CharlmError(f"{what} is longer than the {size:,} bytes expected of "
                                      f"{dest.name}; nothing was written")
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and copied != size:
            raise CharlmError(f"{what} is not the expected {dest.name}: {copied:,} bytes, "
                              f"expected {size:,}; nothing was written")
        mismatch = checksum_mismatch(tmp, **hashes)
        if mismatch:
            raise CharlmError(f"{what} is not the expected {dest.name}: {mismatch}; "
                              "nothing was written")
        os.replace(tmp, dest)
    except OSError as exc:
        raise CharlmError(f"cannot write {dest}: {exc.strerror or exc}; nothing was written") \
            from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # damage found while inflating
        raise CharlmError(f"{what} is damaged ({shown(exc)}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def extract(archive: Path, member: str, dest: Path, *, size: int | None = None,
            md5: str | None = None, sha1: str | None = None, sha256: str | None = None) -> Path:
    """Take `member` out of the zip `archive` into `dest`, streamed and checked; returns dest."""
    archive = Path(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        why = shown(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        raise CharlmError(f"{archive} is not a readable zip archive ({why}); "
                          "nothing was written") from None
    with zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            held = ", ".join(shown(name, 60) for name in zf.namelist()[:5]) or "nothing"
            raise CharlmError(f"{archive} holds no file named {member} (it holds: {held}); "
                              "nothing was written") from None
        if size is not None and info.file_size != size:
            raise CharlmError(f"{member} in {archive} is not the expected {Path(dest).name}: "
                              f"{info.file_size:,} bytes, expected {size:,}; nothing was written")
        try:
            src = zf.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            raise CharlmError(f"{archive} cannot be unpacked ({shown(exc)}); nothing was written") \
                from None
        with src:
            return _copy_checked(src, Path(dest), f"{member} in {archive}", size,
                                 {"md5": md5, "sha1": sha1, "sha256": sha256})


def install(file: Path, member: str, dest: Path, *, size: int | None = None,
            md5: str | None = None, sha1: str | None = None, sha256: str | None = None) -> Path:
    """`charlm data add` for such a corpus: `file` is the zip archive or the file itself."""
    file = Path(file)
    if zipfile.is_zipfile(file):
        return extract(file, member, dest, size=size, md5=md5, sha1=sha1, sha256=sha256)
    try:
        with open(file, "rb") as src:
            return _copy_checked(src, Path(dest), str(file), size,
                                 {"md5": md5, "sha1": sha1, "sha256": sha256})
    except FileNotFoundError:
        raise CharlmError(f"{file} does not exist; check the path") from None

