"""Text in: reading a UTF-8 file (one reader, one set of refusals) and the preprocessing modes.

No torch here: `charlm --help` and config checking import this module.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from charlm.errors import CharlmError, UsageError

PREPROCESSING = ("d2l", "lower", "raw", "bytes")

_NON_LETTERS = re.compile("[^A-Za-z]+")
STREAM_LIMIT = 1 << 30  # bytes read from a pipe or device before it is refused
_CHUNK = 1 << 24


def preprocess(text: str, mode: str) -> str:
    """Apply a preprocessing mode: "d2l" (letters and single spaces, lowercased), "lower", "raw",
    or "bytes": the text's UTF-8 bytes, one character U+0000..U+00FF per byte (see `readable`)."""
    if mode == "d2l":
        # Exactly d2l's read_time_machine: runs of non-letters (newlines too) become one space.
        return _NON_LETTERS.sub(" ", text).lower()
    if mode == "lower":
        return text.lower()
    if mode == "raw":
        return text
    if mode == "bytes":
        return text.encode("utf-8", "surrogatepass").decode("latin-1")
    raise UsageError(f"unknown preprocessing {mode!r}; choose one of: {', '.join(PREPROCESSING)}")


def read_text(path: str | Path, what: str = "", allow_empty: bool = False) -> str:
    """A UTF-8 text file's contents, or a one-line CharlmError saying what is wrong with it.

    `what` names the file in messages ("--text", "--prefix-file"; nothing for a corpus file).
    A BOM is dropped. NUL bytes are refused: UTF-8 text never holds them, while binary files and
    UTF-16 text (which would otherwise decode into nonsense) do. Anything but a regular file (a
    pipe, /dev/stdin, a device) is read as a stream of at most STREAM_LIMIT bytes; every file is
    read in chunks, so /dev/zero is refused at its first chunk and a signal is never kept
    waiting for a read.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CharlmError(f"{label} does not exist; check the path") from None
    except OSError as exc:
        raise CharlmError(f"cannot read {label}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CharlmError(f"{label} is a directory; give a UTF-8 text file")
    try:
        regular = stat.S_ISREG(st.st_mode)
        data = _read_bytes(path, label, st.st_size if regular else 0,
                           None if regular else STREAM_LIMIT)
    except OSError as exc:
        raise CharlmError(f"cannot read {label}: {exc.strerror}") from None
    if not data and not allow_empty:
        raise CharlmError(f"{label} is empty; give a file that holds some text")
    if b"\0" in data:
        raise CharlmError(
            f"{label} is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); "
            "give a UTF-8 text file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CharlmError(
            f"{label} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt"
        ) from None


def _read_bytes(path: Path, label: str, size: int, limit: int | None) -> bytearray:
    """The file's bytes, read in chunks into one buffer of the expected `size` (grown if the
    file is longer); a NUL byte stops the reading (it is refused below), and more than `limit`
    bytes (None: no limit) are refused."""
    data = bytearray(size)
    got = 0
    with open(path, "rb", buffering=0) as fh:
        with memoryview(data) as view:
            while got < size and (n := fh.readinto(view[got : got + _CHUNK])):
                got += n
                if data.find(b"\0", got - n, got) >= 0:
                    return data[:got]
        del data[got:]
        while chunk := fh.read(_CHUNK):  # a stream, or a file that grew while being read
            data += chunk
            if b"\0" in chunk:
                break
            if limit is not None and len(data) > limit:
                raise CharlmError(
                    f"{label} is not a regular file and sent more than {limit:,} bytes; save "
                    "the text you want to a file and give that")
    return data
def readable(text: str, mode: str) -> str:
    """What a person reads of preprocessed text: for "bytes", the bytes decoded as UTF-8 (a
    sequence that is invalid or cut off shows as U+FFFD); other modes are text already."""
    if mode != "bytes":
        return text
    return text.encode("latin-1", "replace").decode("utf-8", "replace")
