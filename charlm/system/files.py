"""Files written whole or not at all: temp file in the same directory, flush + fsync,
os.replace, then the directory fsynced. The one way charlm writes a file that must survive
a crash (checkpoints, run files, the corpus cache, exported folders): `atomic_write` for bytes
made here, `atomic_copy` for a stream (a file or an archive member), each with an optional check
of the finished temp file before it takes the name; `temp_path` names every temp file and
folder, so `remove_stale_temp_files` recognises them all.

    dir/
      name                        the file; its previous version stays until the new one is whole
      .name.<pid>.<hex>.tmp       only while a writer runs, or after it was killed mid-write:
                                  `remove_stale_temp_files` deletes those of dead writers
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

from charlm.errors import CharlmError

_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
KEPT = "the previous {name}, if any, is intact"  # what a failed write left as it was
CHUNK = 1 << 22  # bytes per read of atomic_copy


def temp_path(path: str | Path) -> Path:
    """`.name.<pid>.<hex>.tmp` beside `path`: the one temp name, which `remove_stale_temp_files`
    knows by its pattern (and removes once its writer is dead)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *,
                 check: Callable[[Path], None] | None = None, kept: str = KEPT) -> Path:
    """Write `path` through a temp file in the same directory: flush + fsync, then os.replace.

    Whatever goes wrong (full disk, a write error, Ctrl-C), the previous file at `path` stays
    intact and the temp file is removed; only SIGKILL or a power cut can leave one behind, and
    `remove_stale_temp_files` clears those. The new file gets the usual mode (0666 less umask).
    `check(temp)` may refuse the finished file by raising: it then never takes the name. An
    OSError becomes a one-line CharlmError that names the file and ends with `kept`.
    """
    path = Path(path)
    tmp = temp_path(path)
    kept = kept.format(name=path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            if check is not None:
                check(tmp)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as exc:
        raise CharlmError(f"cannot write {path}: {exc.strerror or exc}; {kept}") from exc
    except RuntimeError as exc:  # torch.save's writer reports a failed write its own way
        reason = _write_failure(exc, path.parent)
        if reason is None:
            raise
        raise CharlmError(f"cannot write {path}: {reason}; {kept}") from exc
    _fsync_dir(path.parent)
    return path


class TooLong(Exception):
    """`atomic_copy`'s source held more than `limit` bytes (nothing was written)."""


def atomic_copy(src: BinaryIO, path: str | Path, *, limit: int | None = None,
                check: Callable[[Path, int], None] | None = None, kept: str = KEPT) -> Path:
    """Stream `src` into `path` as `atomic_write` writes: whole or not at all. More than `limit`
    bytes raise TooLong; `check(temp, bytes copied)` may refuse the finished copy by raising."""
    copied = 0

    def copy(out: BinaryIO) -> None:
        nonlocal copied
        while block := src.read(CHUNK):
            copied += len(block)
            if limit is not None and copied > limit:
                raise TooLong(limit)
            out.write(block)

    return atomic_write(path, copy, check=None if check is None else lambda tmp: check(tmp, copied),
                        kept=kept)


def _write_failure(exc: RuntimeError, directory: Path) -> str | None:
    """What a RuntimeError from torch.save's zip writer says about the disk, or None if it is
    not one. On a full disk it reads "[enforce fail at inline_container.cc:...] unexpected pos
    ...", with the OSError it swallowed as its context (when it wrote to a Python file)."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "inline_container" not in text and "PytorchStreamWriter" not in text:
        return None
    try:
        free = os.statvfs(directory)
        if free.f_bavail * free.f_frsize < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return f"write failed ({text.strip().splitlines()[0]})"


def remove_stale_temp_files(directory: str | Path, min_age: float = 0.0) -> list[Path]:
    """Delete the temp files of writers that are no longer running (killed mid-write).

    `min_age` (seconds) spares young files too, for folders no lock protects, where a writer
    in another PID namespace may look dead from here.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _TEMP.match(name)
        if match is None or _pid_alive(int(match[1])):
            continue
        path = Path(directory) / name
        try:
            if min_age and now - path.stat().st_mtime < min_age:
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
