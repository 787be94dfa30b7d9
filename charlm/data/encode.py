"""A stream of preprocessed chunks -> one tensor of token ids, in the narrowest integer type.

One pass over the text, whatever its size. Building a vocabulary needs every count before the
first id can be final, so symbols first get provisional ids, numbered as they are first met
(chunk by chunk), and are renumbered once the stream ends::

    chunk "abca" --code points--> [97 98 99 97] --first seen--> [0 1 2 0]   (provisional ids)
         counts per code point += bincount                      (the whole text, for the ranking)
    output [ 0 1 2 0 ... | never written ]      uint8 while <= 256 symbols, then int16, int32
    end:   Vocab.from_counts (most frequent first; min_freq, max_vocab) -> remap[provisional]
           output[i] = remap[output[i]], chunk by chunk, in place (or into a narrower tensor)

With a vocabulary given (resuming, evaluating), ids are final at once and reading stops after
`max_tokens`. With one being built, `max_tokens` stops the storing, not the counting: like d2l's
loader, the vocabulary comes from the whole text.

Memory: the output (1, 2 or 4 bytes per token: `token_dtype`), allocated once for an upper
bound on the count and touched only where written (untouched pages cost no memory), plus one
chunk's temporaries (about 12 bytes per character of a chunk). The ids are widened to int64 per
batch, where they are used (`charlm.data.batches`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from charlm.data.vocab import Vocab, code_points, one_thread

_LIMITS = ((256, torch.uint8), (1 << 15, torch.int16), (1 << 31, torch.int32))
REMAP_CHUNK = 1 << 22  # tokens converted at a time (32 MB of int32 temporaries)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest dtype that holds ids 0 .. vocab_size - 1: uint8, int16 or int32."""
    return next(dtype for limit, dtype in _LIMITS if vocab_size <= limit)


def _code_points(chunk: str | bytes) -> torch.Tensor:
    if isinstance(chunk, bytes):  # "bytes" preprocessing: each byte is its own symbol
        return torch.frombuffer(bytearray(chunk), dtype=torch.uint8).to(torch.int32)
    return code_points(chunk)


class _Output:
    """The ids written so far, in a tensor of `capacity` slots of the current dtype."""

    def __init__(self, capacity: int, dtype: torch.dtype):
        self.data = torch.empty(max(capacity, 1), dtype=dtype)
        self.size = 0

    def write(self, ids: torch.Tensor) -> None:
        end = self.size + ids.numel()
        if end > self.data.numel():  # the bound was too low: grow (never expected)
            bigger = torch.empty(max(end, self.data.numel() * 3 // 2), dtype=self.data.dtype)
            bigger[: self.size] = self.data[: self.size]
            self.data = bigger
        self.data[self.size : end] = ids
        self.size = end

    def to_dtype(self, dtype: torch.dtype, remap: torch.Tensor | None = None) -> None:
        """Convert what is written to `dtype`, each id i becoming remap[i] on the way."""
        same = dtype == self.data.dtype
        out = self.data if same else torch.empty(self.data.numel(), dtype=dtype)
        for start in range(0, self.size, REMAP_CHUNK):
            stop = min(start + REMAP_CHUNK, self.size)
            part = self.data[start:stop]
            if remap is not None:
                part = remap.index_select(0, part.int())
            out[start:stop] = part
        self.data = out

    def tensor(self) -> torch.Tensor:
        return self.data[: self.size]


def encode_chunks(chunks: Iterable[str | bytes], capacity: int, vocab: Vocab | None = None, *,
                  min_freq: int = 1, max_vocab: int = 0, max_tokens: int = 0,
                  all_bytes: bool = False) -> tuple[Vocab, torch.Tensor]:
    """(vocabulary, ids) of the text the chunks make up; `capacity` bounds the token count.

    `vocab` given: encode with it (unknown symbols -> 0, <unk>). Otherwise build one as
    `Vocab.build` would from the whole text, or with `all_bytes` (byte chunks) `Vocab.of_bytes`:
    every byte. `max_tokens` > 0 keeps only the first ones."""
    room = min(capacity, max_tokens) if max_tokens else capacity
    with one_thread():
        if vocab is not None:
            return vocab, _encode_with(vocab, chunks, room)
        return _build(chunks, room, min_freq, max_vocab or None, all_bytes)


def _encode_with(vocab: Vocab, chunks: Iterable[str | bytes], room: int) -> torch.Tensor:
    out = _Output(room, token_dtype(len(vocab)))
    for chunk in chunks:
        ids = vocab.lookup(_code_points(chunk))
        out.write(ids[: room - out.size])
        if out.size >= room:
            break
    return out.tensor()


def _build(chunks: Iterable[str | bytes], room: int, min_freq: int,
           max_size: int | None, all_bytes: bool = False) -> tuple[Vocab, torch.Tensor]:
    provisional = torch.full((0,), -1, dtype=torch.int32)  # code point -> provisional id
    counts = torch.zeros(0, dtype=torch.int64)  # code point -> occurrences
    known = 0  # provisional ids given so far
    out = _Output(room, torch.uint8)
    for chunk in chunks:
        cps = _code_points(chunk)
        if cps.numel() == 0:
            continue
        here = torch.bincount(cps)  # this chunk's counts by code point
        if here.numel() > counts.numel():
            grown = torch.full((here.numel(),), -1, dtype=torch.int32)
            grown[: provisional.numel()] = provisional
            provisional = grown
            here[: counts.numel()] += counts
            counts = here
        else:
            counts[: here.numel()] += here
        present = torch.nonzero(here).flatten()  # ascending code points: new ones numbered so
        new = present[provisional[present] < 0]
        if new.numel():
            provisional[new] = torch.arange(known, known + new.numel(), dtype=torch.int32)
            known += new.numel()
        if out.size < room:
            wanted = token_dtype(known)
            if wanted.itemsize > out.data.dtype.itemsize:
                out.to_dtype(wanted)
            take = cps[: room - out.size]
            out.write(provisional.index_select(0, take))
    if all_bytes:
        vocab = Vocab.of_bytes(counts)
    else:
        present = torch.nonzero(counts).flatten()
        vocab = Vocab.from_counts(present, counts[present], min_freq, max_size)
    # provisional id -> final id; symbols left out of the vocabulary -> 0 (<unk>)
    final = torch.zeros(max(known, 1), dtype=torch.int32)
    kept = torch.tensor([ord(t) for t in vocab.tokens[1:]], dtype=torch.int64)
    ids = torch.arange(1, len(vocab), dtype=torch.int32)
    seen = kept < provisional.numel()  # all_bytes keeps bytes the text never had
    kept, ids = kept[seen], ids[seen]
    seen = provisional[kept] >= 0
    if seen.any():
        final[provisional[kept[seen]].long()] = ids[seen]
    out.to_dtype(token_dtype(len(vocab)), final)
    return vocab, out.tensor()


class SymbolCounter:
    """Counts of every symbol of a text fed in pieces, without encoding it (`charlm data info`)."""

    def __init__(self):
        self.counts = torch.zeros(0, dtype=torch.int64)  # by code point (or byte)

    def add(self, chunk: str | bytes) -> None:
        if not chunk:
            return
        with one_thread():
            found = torch.bincount(_code_points(chunk))
            if found.numel() > self.counts.numel():
                found[: self.counts.numel()] += self.counts
                self.counts = found
            else:
                self.counts[: found.numel()] += found

    def vocab(self) -> Vocab:
        """Every symbol counted, most frequent first, as `Vocab.build` ranks them."""
        present = torch.nonzero(self.counts).flatten()
        return Vocab.from_counts(present, self.counts[present])
