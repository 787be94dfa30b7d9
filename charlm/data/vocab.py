"""The character vocabulary: characters to integer ids and back.

Characters become integer ids without a Python loop per character: each chunk of text is encoded
to UTF-32 (one int32 code point per character, read in place with ``torch.frombuffer``), counted
with ``bincount`` and mapped to ids through a dense table indexed by code point::

    text chunk   "hello"  --utf-32-le-->  [104 101 108 108 111]   code points (int32)
    table        table[cp] = id, 0 (<unk>) for code points outside the vocabulary
    ids          table.index_select(cp)  -->  written straight into the preallocated output

Chunks of ``CHUNK_CHARS`` characters keep the temporaries small, so encoding needs the output
(4 bytes per character) plus about 10 MB, whatever the size of the text.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch

from charlm.errors import CharlmError, UsageError
from charlm.system.threads import threads_within

CHUNK_CHARS = 1 << 20  # 1M characters: 4 MB of code points per chunk


def code_points(chunk: str) -> torch.Tensor:
    """One int32 code point per character, viewing the encoded bytes without a copy."""
    data = chunk.encode("utf-32-le", "surrogatepass")  # lone surrogates are kept, not an error
    with warnings.catch_warnings():
        # The buffer is read-only bytes; we only ever read from this tensor.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.int32)


@contextlib.contextmanager
def one_thread():
    """Run the chunk loop on one intra-op thread.

    Each chunk is a few memory-bound passes over 4 MB; splitting those across threads saves
    little, and on a busy machine every op then waits for a descheduled thread at the barrier
    (measured in docs/BENCHMARKS.md: 2 threads under load were 2-4x slower than 1).
    """
    with threads_within(1):
        yield


def _chunks(text: str) -> Iterable[tuple[int, str]]:
    for start in range(0, len(text), CHUNK_CHARS):
        yield start, text[start : start + CHUNK_CHARS]


def _count_code_points(text: str) -> torch.Tensor:
    """Counts indexed by code point (int64), as long as the largest code point in the text + 1."""
    total = torch.zeros(0, dtype=torch.int64)
    with one_thread():
        for _, chunk in _chunks(text):
            counts = torch.bincount(code_points(chunk))
            if len(counts) > len(total):
                counts[: len(total)] += total
                total = counts
            else:
                total[: len(counts)] += counts
    return total


class Vocab:
    """Character vocabulary: ``tokens[i]`` is the string for id ``i``; id 0 is ``<unk>``.

    Every other token is a single character. ``counts[i]`` is how often token ``i`` occurred in
    the text the vocabulary was built from (``counts[0]``: characters that were mapped to
    ``<unk>``); it is informational and may be empty for a vocabulary loaded without counts.
    """

    UNK = "<unk>"
    BYTES = range(1, 256)  # what a text's bytes can be: NUL is refused in every text

    def __init__(self, tokens: list[str], counts: list[int] | None = None):
        self.tokens = list(tokens)
        self.counts = list(counts) if counts is not None else []
        self._index = {tok: i for i, tok in enumerate(self.tokens)}
        known = [ord(t) for t in self.tokens[1:]]
        # Dense lookup table indexed by code point; the extra last slot (id 0) catches every code
        # point above the largest known one after clamping.
        table = torch.zeros((max(known) + 2) if known else 1, dtype=torch.int32)
        if known:
            table[torch.tensor(known, dtype=torch.int64)] = torch.arange(
                1, len(self.tokens), dtype=torch.int32
            )
        self._table = table

    @classmethod
    def build(cls, text: str, min_freq: int = 1, max_size: int | None = None) -> Vocab:
        """Vocabulary of the characters of ``text``, most frequent first (ties: by character).

        Characters seen fewer than ``min_freq`` times, or ranked beyond ``max_size`` (which
        counts characters, not ``<unk>``), are left out and will encode as ``<unk>``.
        """
        by_code_point = _count_code_points(text)
        present = torch.nonzero(by_code_point).flatten()
        return cls.from_counts(present, by_code_point[present], min_freq, max_size)

    @classmethod
    def of_bytes(cls, counts: torch.Tensor) -> Vocab:
        """A byte-level model's vocabulary: every byte a text can hold, whether the training
        text had it or not (a byte is never <unk>), most frequent first; `counts` by byte value.
        With <unk>, 256 ids: one byte per token still."""
        full = torch.zeros(256, dtype=torch.int64)
        full[: min(counts.numel(), 256)] = counts[:256]
        order = torch.sort(full[1:], descending=True, stable=True).indices + 1
        return cls([cls.UNK] + [chr(b) for b in order.tolist()],
                   [int(full[0])] + full[order].tolist())

    @classmethod
    def from_counts(cls, code_points: torch.Tensor, counts: torch.Tensor, min_freq: int = 1,
                    max_size: int | None = None) -> Vocab:
        """`build`'s vocabulary from counts: `counts[i]` occurrences of code point
        `code_points[i]` (ascending, all distinct), as a streamed count gives them."""
        if min_freq < 1:
            raise UsageError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < 1:
            raise UsageError(f"max_size must be >= 1 (or None for no limit), got {max_size}")
        total = int(counts.sum())
        keep = counts >= min_freq
        present, counts = code_points[keep], counts[keep]
        # Stable sort on descending count over code points that are already ascending: ties stay
        # ordered by character.
        order = torch.sort(counts, descending=True, stable=True).indices
        if max_size is not None:
            order = order[:max_size]
        kept_cps = present[order].tolist()
        kept_counts = counts[order].tolist()
        unknown = total - sum(kept_counts)
        return cls([cls.UNK] + [chr(c) for c in kept_cps], [unknown] + kept_counts)

    def extended(self, other: Vocab) -> tuple[Vocab, torch.Tensor]:
        """This vocabulary with the tokens of `other` it lacks after its own (in `other`'s
        order), so every id of this one keeps its token; and the map from `other`'s ids to the
        new ones (int32, `other`'s <unk> to <unk>). Counts are `other`'s."""
        tokens = self.tokens + [t for t in other.tokens[1:] if t not in self._index]
        have = dict(zip(other.tokens, other.counts)) if other.counts else None
        grown = Vocab(tokens, [have.get(t, 0) for t in tokens] if have else None)
        return grown, torch.tensor([grown.index(t) for t in other.tokens], dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def index(self, token: str) -> int:
        """The id of a token (0 for anything unknown)."""
        return self._index.get(token, 0)

    def encode(self, text: str) -> torch.Tensor:
        """Ids of the characters of ``text`` as a 1-D int32 tensor; unknown characters give 0."""
        out = torch.empty(len(text), dtype=torch.int32)
        scratch = torch.empty(min(len(text), CHUNK_CHARS), dtype=torch.int32)
        with one_thread():
            for start, chunk in _chunks(text):
                self.lookup(code_points(chunk), out[start : start + len(chunk)],
                            scratch[: len(chunk)])
        return out

    def lookup(self, code_points: torch.Tensor, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Ids (int32) of int32 code points >= 0: the table lookup behind `encode`."""
        cps = torch.clamp(code_points, max=len(self._table) - 1, out=scratch)
        return torch.index_select(self._table, 0, cps, out=out)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        """The text of a sequence of ids (a tensor of any shape is flattened); 0 gives "<unk>"."""
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex():
                raise CharlmError(f"cannot decode a tensor of {ids.dtype}: ids must be integers")
            ids = ids.flatten().tolist()
        else:
            ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= len(self.tokens)):
            bad = next(i for i in ids if not 0 <= i < len(self.tokens))
            raise CharlmError(
                f"id {bad} is outside this vocabulary of {len(self.tokens)} tokens; "
                "was the text encoded with another vocabulary?"
            )
        return "".join(map(self.tokens.__getitem__, ids))

    def to_dict(self) -> dict:
        """Plain lists of strings and ints, safe for ``torch.save`` / JSON."""
        return {"tokens": list(self.tokens), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        """The inverse of ``to_dict``; raises CharlmError on anything malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise CharlmError("invalid vocabulary: expected a dict with a 'tokens' list")
        tokens = d["tokens"]
        if not tokens or tokens[0] != cls.UNK:
            raise CharlmError(f"invalid vocabulary: the first token must be {cls.UNK!r}")
        for tok in tokens[1:]:
            if not isinstance(tok, str) or len(tok) != 1:
                raise CharlmError(
                    f"invalid vocabulary: token {tok!r} is not a single character"
                )
        if len(set(tokens)) != len(tokens):
            raise CharlmError("invalid vocabulary: tokens are not unique")
        counts = d.get("counts") or []
        if counts and (
            len(counts) != len(tokens)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        ):
            raise CharlmError("invalid vocabulary: 'counts' must be one count >= 0 per token")
        return cls(tokens, counts)
