"""`charlm eval perplexity`: the exact perplexity of a trained model on a split or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.options import CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt
from charlm.errors import CharlmError, UsageError

SPLITS = ("train", "val", "test")


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
    from charlm.training.splits import run_split

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
        tokens = run_split(loaded, split)
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
    from rich.table import Table

    from charlm.console import console

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
    console().print(table)
