"""From a corpus name or files to device-resident token splits.

    corpus text --preprocess--> text --Vocab.encode--> int tensor (one, on the device)
                --max_tokens--> --split: [ train 90% | val 10% | test 0% ]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.data.batches import limit_tokens, split_tokens
from charlm.training.config import TrainConfig
from charlm.data.corpus import CorpusText, load_corpus
from charlm.data.vocab import Vocab, preprocess


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


def corpus_from_config(cfg: TrainConfig, progress: bool = True) -> CorpusText:
    return load_corpus(
        cfg.corpus or None,
        texts=[Path(t) for t in cfg.text] or None,
        url=cfg.url,
        sha256=cfg.sha256,
        data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
        progress=progress,
    )


def load_dataset(cfg: TrainConfig, vocab: dict | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> Dataset:
    """Load, preprocess, encode and split; `vocab` (a checkpoint's) is reused when resuming."""
    corpus = corpus_from_config(cfg, progress=progress)
    mode = cfg.preprocessing or corpus.preprocessing
    text = preprocess(corpus.text, mode)
    voc = Vocab.from_dict(vocab) if vocab is not None else Vocab.build(
        text, min_freq=cfg.min_freq, max_size=cfg.max_vocab or None)
    tokens = limit_tokens(voc.encode(text), cfg.max_tokens or None)
    fractions = (1.0 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction)
    tokens = tokens.to(device)
    train, val, test = split_tokens(tokens, fractions)
    return Dataset(corpus.name, corpus.source, mode, voc, corpus.sample_prefix, tokens.numel(),
                   train, val, test)
