"""`charlm eval perplexity`: the exact perplexity of a trained model on a split or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from charlm.cli.options import CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt
from charlm.errors import CharlmError, UsageError

if TYPE_CHECKING:  # torch is imported by the command itself: `charlm --help` stays quick
    import torch

    from charlm.training.checkpoint import Loaded

SPLITS = ("train", "val", "test")
FRACTION_OPTION = {"val": "--val-fraction", "test": "--test-fraction"}


def _split_tokens(loaded: "Loaded", split: str) -> "torch.Tensor":
    """Rebuild the run's splits from its train_config; the corpus must be the one trained on."""
    from charlm.data.corpus import default_fractions
    from charlm.data.dataset import load_dataset
    from charlm.training.config import DATA, OPTIONS, build_config

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
    return getattr(data, split)


def eval_perplexity(
    split: Optional[str] = typer.Option(None, "--split", help="Which split of the run's own corpus: train, val (default) or test."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate this UTF-8 file instead (the checkpoint's preprocessing and vocabulary applied)."),
    checkpoint: Optional[str] = CheckpointOpt,
    batch_size: int = typer.Option(512, "--batch-size", "-b", help="Characters per forward pass. Evaluation is one stream with the state carried across passes, so this trades memory for speed and never changes the result."),
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Exact perplexity of a trained model on its validation split, another split or a file.

    One sequential pass over every character after the first, each predicted from all of the
    text before it (the state is carried). Reports perplexity, nats and bits per character,
    the characters evaluated and the share of them that were <unk>.

    Example: charlm eval perplexity --split test --json
    """
    from charlm.data.text import preprocess, read_text
    from charlm.evaluate import perplexity_of
    from charlm.training.checkpoint import load_model

    if split is not None and text is not None:
        raise UsageError("give --split or --text, not both")
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    raw = read_text(text, "--text", allow_empty=True) if text is not None else None
    if raw == "":
        raise CharlmError(f"--text {text} is empty: nothing to evaluate; give a file of at least 2 characters")

    loaded = load_model(checkpoint, impl, device)
    if text is not None:
        tokens = loaded.vocab.encode(preprocess(raw, loaded.preprocessing)).to(loaded.device)
        source, what = str(text), f"--text {text}"
    else:
        split = split or "val"
        tokens = _split_tokens(loaded, split)
        source, what = f"{split} split", f"the {split} split of the run of {loaded.path}"
    if tokens.numel() < 2:
        raise CharlmError(
            f"{what} has {tokens.numel()} character{'s' if tokens.numel() != 1 else ''} after "
            "preprocessing: nothing to evaluate (a character is predicted from the ones before "
            "it, so at least 2 are needed)"
        )
    result = perplexity_of(loaded.model, tokens, window=batch_size)

    if json_out:
        payload = {"checkpoint": str(loaded.path), "split": None if text is not None else split,
                   "text": str(text) if text is not None else None, **result.to_dict(),
                   "impl": loaded.model.config.impl, "device": str(loaded.device)}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="charlm eval perplexity", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("checkpoint", str(loaded.path))
    table.add_row("evaluated on", source)
    table.add_row("perplexity", f"{result.perplexity:.4f}")
    table.add_row("nats / char", f"{result.nats_per_char:.4f}")
    table.add_row("bits / char", f"{result.bits_per_char:.4f}")
    table.add_row("characters evaluated", f"{result.characters:,}")
    table.add_row("<unk> share", f"{result.unk_share:.4%} ({result.unk_characters:,})")
    Console().print(table)
