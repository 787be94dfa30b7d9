"""From a corpus name or files to device-resident token splits.

    corpus file(s) --stream: read, decode, preprocess, in chunks--> --encode_chunks (vocabulary
      counted on the way; the first max_tokens kept)--> one uint8 / int16 / int32 tensor
      --.to(device)--> --split: [ train 90% | val 10% | test 0% ]  (enwik8, text8: 90/5/5)

No copy of the whole text is ever held: a 1 GB corpus of up to 256 symbols costs 1 GB here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.data.batches import split_tokens
from charlm.data.corpus import locate_corpus
from charlm.data.encode import encode_chunks, token_dtype
from charlm.data.text import preprocess
from charlm.data.vocab import Vocab
from charlm.errors import UsageError


@dataclass
class Dataset:
    name: str
    source: str
    preprocessing: str
    vocab: Vocab
    default_prefix: str
    num_tokens: int
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def sample_prefix(self, given: str | None) -> str:
        prefix = self.default_prefix if given is None else given
        return preprocess(prefix, self.preprocessing).lstrip() if prefix else ""

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the encoded corpus (every split), computed once: what a checkpoint records
        of its text, so a resume or an evaluation can tell another text of the same length."""
        return token_digest(self.train, self.val, self.test)

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "num_tokens": self.num_tokens,
            "splits": {"train": self.train.numel(), "val": self.val.numel(),
                       "test": self.test.numel()},
            "sha256": self.digest,
        }


def token_digest(*parts: torch.Tensor, chunk: int = 1 << 22) -> str:
    """sha256 of the token ids of `parts`, one after the other, as int32 in the machine's byte
    order (little-endian wherever torch runs): the same for any dtype or device the ids are
    kept in. Chunked, so hashing costs 16 MB of memory whatever the corpus."""
    h = hashlib.sha256()
    for part in parts:
        flat = part.reshape(-1)
        for start in range(0, flat.numel(), chunk):
            block = flat[start : start + chunk].to("cpu", torch.int32).contiguous()
            h.update(ctypes.string_at(block.data_ptr(), block.numel() * 4))
    return h.hexdigest()


def _renumbered(tokens: torch.Tensor, remap: torch.Tensor, dtype: torch.dtype,
                chunk: int = 1 << 22) -> torch.Tensor:
    """remap[tokens] in `dtype`, a chunk at a time (no int64 copy of a whole corpus)."""
    out = torch.empty(tokens.numel(), dtype=dtype)
    for start in range(0, tokens.numel(), chunk):
        ids = tokens[start : start + chunk].to(torch.int64)
        out[start : start + chunk] = remap.index_select(0, ids).to(dtype)
    return out


def load_dataset(*, corpus: str | None = None, text: list[str] = (), url: str | None = None,
                 sha256: str | None = None, data_dir: str | None = None,
                 download_timeout: float = 1800.0, download_min_rate: int = 1024,
                 preprocessing: str | None = None, min_freq: int = 1, max_vocab: int = 0,
                 max_tokens: int = 0, val_fraction: float | None = None,
                 test_fraction: float | None = None, vocab: dict | None = None,
                 extend: dict | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> Dataset:
    """Load, preprocess, encode and split; `vocab` (a checkpoint's) is reused when resuming;
    `extend` (a checkpoint's, when fine-tuning) is kept and extended by the text's characters.

    The keywords are the data options of `charlm train` (`TrainConfig.section(DATA)`); None
    means the corpus's own (preprocessing, split fractions)."""
    source = locate_corpus(corpus or None, texts=[Path(t) for t in text] or None, url=url,
                           sha256=sha256, data_dir=Path(data_dir) if data_dir else None,
                           progress=progress, preprocessing=preprocessing,
                           network={"deadline": download_timeout, "min_rate": download_min_rate})
    mode = preprocessing or source.preprocessing
    if mode == "bytes" and vocab is None and (min_freq != 1 or max_vocab):
        raise UsageError(f"--{'min-freq' if min_freq != 1 else 'max-vocab'} does not apply to "
                         "--preprocessing bytes, whose vocabulary is every byte (no <unk>); "
                         "drop it, or choose another --preprocessing")
    voc, tokens = encode_chunks(
        source.chunks(mode), source.capacity(), Vocab.from_dict(vocab) if vocab is not None else None,
        min_freq=min_freq, max_vocab=max_vocab, max_tokens=max_tokens, all_bytes=mode == "bytes")
    if extend is not None:
        voc, remap = Vocab.from_dict(extend).extended(voc)
        tokens = _renumbered(tokens, remap, token_dtype(len(voc)))
    val_fraction = source.val_fraction if val_fraction is None else val_fraction
    test_fraction = source.test_fraction if test_fraction is None else test_fraction
    if val_fraction + test_fraction >= 1.0:
        raise UsageError("val_fraction + test_fraction must leave some text for training")
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    tokens = tokens.to(device)
    train, val, test = split_tokens(tokens, fractions)
    return Dataset(source.name, source.source, mode, voc, source.sample_prefix, tokens.numel(),
                   train, val, test)
