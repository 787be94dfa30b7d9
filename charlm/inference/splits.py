"""A trained model's own splits, rebuilt: the text it was trained on, cut as it was cut then.

`charlm eval perplexity` (its default, the validation split) and `charlm export` (the card's
figures) read the split from here, so both give the same numbers for the same model.
"""

from __future__ import annotations

from charlm.data.corpus import default_fractions
from charlm.data.dataset import Dataset, load_dataset
from charlm.errors import CharlmError
from charlm.inference.loading import Loaded

FRACTION_OPTION = {"val": "--val-fraction", "test": "--test-fraction"}


def run_data(loaded: Loaded, split: str) -> Dataset:
    """The run's dataset rebuilt, refused where `split` was not held out or the text changed."""
    from charlm.config.train import DATA, OPTIONS
    from charlm.config.build import build_config

    ckpt, path = loaded.ckpt, loaded.path
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict):
        raise CharlmError(
            f"{path} holds no training configuration, so its splits cannot be rebuilt; "
            "evaluate a file with --text FILE"
        )
    cfg = build_config({k: v for k, v in saved.items() if k in OPTIONS}, {})
    corpus_info = ckpt.get("corpus") if isinstance(ckpt.get("corpus"), dict) else {}
    if not (cfg.corpus or cfg.text or cfg.url) and corpus_info.get("name"):
        cfg.corpus = corpus_info["name"]  # the default corpus as it resolved then (or its fallback)
    own = default_fractions(cfg.corpus, cfg.text, cfg.url)  # for a fraction left to the corpus
    fraction = {"val": cfg.val_fraction if cfg.val_fraction is not None else own[0],
                "test": cfg.test_fraction if cfg.test_fraction is not None else own[1]}.get(split)
    if fraction == 0:
        raise CharlmError(
            f"the run of {path} held out no {split} split ({split}_fraction 0): train with "
            f"{FRACTION_OPTION[split]} 0.1 (for example) to get one, or evaluate a file with "
            "--text FILE"
        )
    data = load_dataset(**cfg.section(DATA), vocab=ckpt["vocab"], device=loaded.device)
    trained_on = corpus_info.get("num_tokens")
    if trained_on is not None and trained_on != data.num_tokens:
        raise CharlmError(
            f"the corpus now has {data.num_tokens} tokens but {path} was trained on {trained_on}; "
            "the text changed since training, so its splits cannot be rebuilt: evaluate a file "
            "with --text FILE"
        )
    if corpus_info.get("sha256") not in (None, data.digest):  # same length, other characters
        raise CharlmError(
            f"the corpus now hashes to sha256 {data.digest} but {path} was trained on a text "
            f"that hashes to {corpus_info['sha256']}; the text changed since training, so its "
            "splits cannot be rebuilt: to evaluate this text anyway, pass it with --text FILE"
        )
    return data
