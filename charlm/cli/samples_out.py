"""Printing samples that were drawn into a spool (charlm.system.spool), a chunk at a time.

`charlm generate --num-samples K` (and `--beam`) prints its samples once all are drawn; they
are read back from the spool's file and written in chunks, so that neither the drawing nor the
printing holds a sample whole. The text (and --json's document) is exactly what printing the
whole strings would give: decoding is per token, and a byte-level model's bytes go through one
incremental UTF-8 decoder per sample (as `readable` decodes the whole sample).
"""

from __future__ import annotations

import codecs
import json
import secrets
from typing import Callable, Iterator, TextIO


def _pieces(prefix: str, chunks: Iterator[list[int]], decode: Callable[[list[int]], str],
            mode: str) -> Iterator[str]:
    """prefix + the sample, as readable text (charlm.data.text.readable), piece by piece."""
    utf8 = codecs.getincrementaldecoder("utf-8")("replace") if mode == "bytes" else None

    def show(text: str, final: bool = False) -> str:
        return utf8.decode(text.encode("latin-1", "replace"), final) if utf8 else text

    yield show(prefix)
    for chunk in chunks:
        yield show(decode(chunk))
    yield show("", final=True)


def write_text(out: TextIO, prefix: str, columns: list[Iterator[list[int]]],
               decode: Callable[[list[int]], str], mode: str) -> None:
    """Each sample as prefix + sample, separated by a blank line, then a newline."""
    for k, chunks in enumerate(columns):
        if k:
            out.write("\n\n")
        for piece in _pieces(prefix, chunks, decode, mode):
            out.write(piece)
    out.write("\n")


def write_json(out: TextIO, payload: dict, columns: list[Iterator[list[int]]],
               decode: Callable[[list[int]], str], mode: str) -> None:
    """`payload` with "samples" (the continuations, readable) as json.dumps(indent=2,
    ensure_ascii=False) writes it; each sample's string is streamed into its place."""
    marks = [f"charlm-sample-{k}-{secrets.token_hex(8)}" for k in range(len(columns))]
    text = json.dumps({**payload, "samples": marks}, indent=2, ensure_ascii=False)
    for mark, chunks in zip(marks, columns):
        before, text = text.split(f'"{mark}"', 1)
        out.write(before + '"')
        for piece in _pieces("", chunks, decode, mode):
            out.write(json.dumps(piece, ensure_ascii=False)[1:-1])
        out.write('"')
    out.write(text + "\n")
