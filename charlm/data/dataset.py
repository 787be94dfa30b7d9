"""From a corpus name or files to device-resident token splits.

    corpus text --preprocess--> text --Vocab.encode--> int tensor (one, on the device)
                --max_tokens--> --split: [ train 90% | val 10% | test 0% ]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.data.batches import limit_tokens, split_tokens
from charlm.data.corpus import load_corpus
from charlm.data.text import preprocess
from charlm.data.vocab import Vocab


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

    def describe(self) -> dict:
        return {
            "name": self.name, "source": self.source, "num_tokens": self.num_tokens,
            "splits": {"train": self.train.numel(), "val": self.val.numel(),
                       "test": self.test.numel()},
        }


def load_dataset(*, corpus: str | None = None, text: list[str] = (), url: str | None = None,
                 sha256: str | None = None, data_dir: str | None = None,
                 download_timeout: float = 1800.0, download_min_rate: int = 1024,
                 preprocessing: str | None = None, min_freq: int = 1, max_vocab: int = 0,
                 max_tokens: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.0,
                 vocab: dict | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> Dataset:
    """Load, preprocess, encode and split; `vocab` (a checkpoint's) is reused when resuming.

    The keywords are the data options of `charlm train` (`TrainConfig.section(DATA)`)."""
    source = load_corpus(corpus or None, texts=[Path(t) for t in text] or None, url=url,
                         sha256=sha256, data_dir=Path(data_dir) if data_dir else None,
                         progress=progress,
                         network={"deadline": download_timeout, "min_rate": download_min_rate})
    mode = preprocessing or source.preprocessing
    chars = preprocess(source.text, mode)
    voc = Vocab.from_dict(vocab) if vocab is not None else Vocab.build(
        chars, min_freq=min_freq, max_size=max_vocab or None)
    tokens = limit_tokens(voc.encode(chars), max_tokens or None)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    tokens = tokens.to(device)
    train, val, test = split_tokens(tokens, fractions)
    return Dataset(source.name, source.source, mode, voc, source.sample_prefix, tokens.numel(),
                   train, val, test)
