"""`charlm eval perplexity`: the exact perplexity of a trained model on a split or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.options import (CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt, QuietOpt, WeightsOpt,
                                say)
from charlm.errors import UsageError, warn

SPLITS = ("train", "val", "test")  # charlm.inference.model.SPLITS: --help imports no torch


def _deprecated_batch_size(value: Optional[int]) -> Optional[int]:
    if value is not None:
        warn("--batch-size of eval perplexity is now --chunk (-b means sequences per batch in "
             "charlm train); use --chunk")
    return value


def eval_perplexity(
    split: Optional[str] = typer.Option(None, "--split", metavar=f"[{'|'.join(SPLITS)}]", help="Which split of the run's own corpus: train, val (default) or test.", show_default=False),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate this UTF-8 file instead (the checkpoint's preprocessing and vocabulary applied)."),
    checkpoint: Optional[str] = CheckpointOpt,
    chunk: int = typer.Option(512, "--chunk", help="Characters per forward pass. Evaluation is one stream with the state carried across passes, so this trades memory for speed and never changes the result."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", hidden=True, callback=_deprecated_batch_size),
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    weights: str = WeightsOpt,
    dynamic: bool = typer.Option(False, "--dynamic", help="Also score with dynamic evaluation (Krause et al. 2018): a copy of the model keeps learning from the text already scored, window by window; reported beside the static figure. Needs the run's training text (for its gradient statistics); the checkpoint is never changed."),
    # defaults: the best of a 14-point probe on a Time Machine checkpoint (lr 1e-3 diverged)
    dynamic_lr: float = typer.Option(1e-4, "--dynamic-lr", help="Dynamic evaluation's learning rate (RMS-normalised steps; 0: the static figure)."),
    dynamic_decay: float = typer.Option(0.02, "--dynamic-decay", help="How fast the adapted weights decay back to the trained ones, per window."),
    dynamic_window: int = typer.Option(50, "--dynamic-window", help="Characters per dynamic-evaluation update."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: the faster of one per core and one, timed over the windows; one for a model under 256 units). Never changes the result."),
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Exact perplexity of a trained model on its validation split, another split or a file.

    One sequential pass over every character after the first, each predicted from all of the
    text before it (the state is carried). Reports perplexity, nats and bits per character,
    the characters evaluated and the share of them that were <unk>; with --dynamic also the
    dynamically evaluated figure. Always in full float32 (no TF32). A line on stderr names the
    model used (not with -q). In Python: charlm.load(...).perplexity(split="val").

    Examples: charlm eval perplexity --split test --json;
    charlm eval perplexity --dynamic --dynamic-lr 0.001
    """
    from charlm.inference.model import Model, check_evaluation

    if batch_size is not None:  # the old name: its errors name it
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        chunk = batch_size
    options = dict(text=text, split=split, chunk=chunk, threads=threads, dynamic=dynamic,
                   dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
                   dynamic_window=dynamic_window)
    request = check_evaluation(**options)  # before any checkpoint is read
    model = Model.load(checkpoint, device, impl, weights)
    if not quiet:
        say(f"using {model.describe()}")
    result = model.evaluate(request)
    adapted = result.dynamic

    if json_out:
        figures = result.to_dict()
        figures.pop("dynamic", None)
        payload = {"checkpoint": str(model.path), **figures, "impl": model.config.impl,
                   "device": str(model.device), "weights": model.weights, "model": model.info()}
        if adapted is not None:
            payload["dynamic"] = adapted
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.table import Table

    from charlm.system.console import console

    table = Table(title="charlm eval perplexity", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("checkpoint", str(model.path))
    table.add_row("evaluated on", str(text) if text is not None else f"{result.split} split")
    table.add_row("perplexity", f"{result.perplexity:.4f}")
    table.add_row("nats / char", f"{result.nats_per_char:.4f}")
    table.add_row("bits / char", f"{result.bits_per_char:.4f}")
    table.add_row("characters evaluated", f"{result.characters:,}")
    if result.unit == "byte":  # a byte-level model: the figures above are per character
        table.add_row("perplexity is per", "byte")
        table.add_row("bits / byte", f"{result.bits_per_byte:.4f}")
        table.add_row("bytes evaluated", f"{result.bytes:,}")
    if result.unit == "byte":  # a byte-level model: the figures above are per character
        table.add_row("perplexity is per", "byte")
        table.add_row("bits / byte", f"{result.bits_per_byte:.4f}")
        table.add_row("bytes evaluated", f"{result.bytes:,}")
    table.add_row("<unk> share", f"{result.unk_share:.4%} ({result.unk_characters:,})")
    if adapted is not None:
        table.add_row("dynamic perplexity", f"{adapted['perplexity']:.4f}")
        table.add_row("dynamic nats / char", f"{adapted['nats_per_char']:.4f} "
                                             f"({-adapted['gain_nats_per_char']:+.4f})")
        table.add_row("dynamic bits / char", f"{adapted['bits_per_char']:.4f}")
        table.add_row("dynamic settings", f"lr {adapted['lr']:g}, decay {adapted['decay']:g}, "
                                          f"window {adapted['window']}")
    console().print(table)
