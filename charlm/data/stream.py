"""A corpus read as a stream of preprocessed chunks, so that no copy of the whole text is ever held.

    file(s) --read BLOCK bytes--> bytes --incremental UTF-8 decode--> str --preprocess--> str
        (a b"\\n" between files,        (a sequence cut by a block      (d2l / lower / raw:
         each file's BOM dropped)        boundary waits for its rest)    see `Preprocessor`)
            `--(mode "bytes")--> the bytes themselves, undecoded

Joining the chunks gives exactly `preprocess(text, mode)` of the whole text (tested with blocks
of a few bytes). A file is checked as it is read, with `read_text`'s wording: missing, a
directory, empty, NUL bytes, not UTF-8 (in "bytes" mode any byte but NUL is taken as is).
No torch here.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from charlm.data.text import preprocess
from charlm.errors import CharlmError

BLOCK = 1 << 22  # bytes read at a time: 4 MiB
_BOM = b"\xef\xbb\xbf"
_NON_LETTERS = re.compile("[^A-Za-z]+")


class Preprocessor:
    """`preprocess(text, mode)` applied chunk by chunk, exact across chunk boundaries.

    d2l: a run of non-letters that spans a boundary is still one space (the next chunk's
         leading space is dropped when the last one ended with a space).
    lower: str.lower() looks at neighbours for one rule (a final Greek sigma), so each chunk is
         cut after its last whitespace, which no such rule looks across; the rest waits.
    raw, bytes: nothing to carry.
    """

    def __init__(self, mode: str):
        preprocess("", mode)  # an unknown mode is refused here, with preprocess's message
        self.mode = mode
        self._carry = ""
        self._space = False  # d2l: the output so far ends with a space

    def feed(self, chunk: str) -> str:
        if self.mode == "d2l":
            out = _NON_LETTERS.sub(" ", chunk).lower()
            if self._space and out.startswith(" "):
                out = out[1:]
            if out:
                self._space = out.endswith(" ")
            return out
        if self.mode == "lower":
            text = self._carry + chunk
            cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t")) + 1
            if cut == 0 and len(text) < 4 * BLOCK:  # no whitespace yet: wait for more
                self._carry = text
                return ""
            cut = cut or len(text)
            self._carry = text[cut:]
            return text[:cut].lower()
        return preprocess(chunk, self.mode)

    def flush(self) -> str:
        rest, self._carry = self._carry, ""
        return rest.lower() if rest else ""


def check_file(path: Path) -> int:
    """The size of a corpus file in bytes, or the one-line error `read_text` would give."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; give a UTF-8 text file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror}") from None
    if size == 0:
        raise CharlmError(f"{path} is empty; give a file that holds some text")
    return size


def _blocks(path: Path, block: int) -> Iterator[bytes]:
    """A file's bytes, `block` at a time, its UTF-8 BOM dropped, NUL bytes refused."""
    check_file(path)
    try:
        with open(path, "rb") as f:
            first = True
            while data := f.read(block):
                if first and data.startswith(_BOM[: len(data)]) and len(data) < len(_BOM):
                    data += f.read(len(_BOM))  # a block too short to tell: read on
                if first and data.startswith(_BOM):
                    data = data[len(_BOM):]
                first = False
                if b"\0" in data:
                    raise CharlmError(
                        f"{path} is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 "
                        "file); give a UTF-8 text file"
                    )
                if data:
                    yield data
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror}") from None


def _decoded(path: Path, block: int) -> Iterator[str]:
    """A file's text, decoded block by block; a bad byte is reported at its offset in the file
    (counted after a BOM, as `read_text` counts it)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    done = 0  # bytes handed to the decoder before this block
    data = b""
    try:
        for data in _blocks(path, block):
            pending = len(decoder.getstate()[0])
            text = decoder.decode(data)
            done += len(data)
            if text:
                yield text
        pending = len(decoder.getstate()[0])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        offset = done - pending + exc.start
        raise CharlmError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {offset}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt"
        ) from None


def raw_chunks(files: Iterable[Path] = (), text: str | None = None, *,
               block: int = BLOCK) -> Iterator[str]:
    """The text of `files` joined by newlines (or the in-memory `text`), in pieces."""
    if text is not None:
        for start in range(0, len(text), block):
            yield text[start : start + block]
        return
    for i, path in enumerate(files):
        if i:
            yield "\n"
        yield from _decoded(Path(path), block)


def byte_chunks(files: Iterable[Path] = (), text: str | None = None, *,
                block: int = BLOCK) -> Iterator[bytes]:
    """The UTF-8 bytes of `files` joined by b"\\n" (or of the in-memory `text`), undecoded."""
    if text is not None:
        for piece in raw_chunks(text=text, block=block):
            yield piece.encode("utf-8", "surrogatepass")
        return
    for i, path in enumerate(files):
        if i:
            yield b"\n"
        yield from _blocks(Path(path), block)


def chunks(mode: str, files: Iterable[Path] = (), text: str | None = None, *,
           block: int = BLOCK) -> Iterator[str | bytes]:
    """The preprocessed corpus in pieces: bytes for mode "bytes", str otherwise."""
    if mode == "bytes":
        yield from byte_chunks(files, text, block=block)
        return
    pre = Preprocessor(mode)
    for piece in raw_chunks(files, text, block=block):
        if out := pre.feed(piece):
            yield out
    if out := pre.flush():
        yield out


def capacity(files: Iterable[Path] = (), text: str | None = None) -> int:
    """An upper bound on the tokens of any mode: the UTF-8 bytes, newlines between files
    included (no character is shorter than a byte, and lowercasing never outgrows that)."""
    if text is not None:
        return len(text.encode("utf-8", "surrogatepass"))
    sizes = [check_file(Path(p)) for p in files]
    return sum(sizes) + max(len(sizes) - 1, 0)
