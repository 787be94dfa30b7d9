"""`charlm eval perplexity`: the exact perplexity of a trained model on a split or a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from charlm.cli.options import CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt, WeightsOpt
from charlm.errors import CharlmError, UsageError

if TYPE_CHECKING:  # torch is imported by the command itself: `charlm --help` stays quick
    import torch

    from charlm.inference.loading import Loaded

SPLITS = ("train", "val", "test")


def eval_perplexity(
    split: Optional[str] = typer.Option(None, "--split", help="Which split of the run's own corpus: train, val (default) or test."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate this UTF-8 file instead (the checkpoint's preprocessing and vocabulary applied)."),
    checkpoint: Optional[str] = CheckpointOpt,
    batch_size: int = typer.Option(512, "--batch-size", "-b", help="Characters per forward pass. Evaluation is one stream with the state carried across passes, so this trades memory for speed and never changes the result."),
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
) -> None:
    """Exact perplexity of a trained model on its validation split, another split or a file.

    One sequential pass over every character after the first, each predicted from all of the
    text before it (the state is carried). Reports perplexity, nats and bits per character,
    the characters evaluated and the share of them that were <unk>; with --dynamic also the
    dynamically evaluated figure. Always in full float32 (no TF32).

    Examples: charlm eval perplexity --split test --json;
    charlm eval perplexity --dynamic --dynamic-lr 0.001
    """
    from charlm.data.text import preprocess, read_text
    from charlm.inference.evaluate import perplexity_of
    from charlm.inference.loading import load_model
    from charlm.inference.splits import run_data

    if split is not None and text is not None:
        raise UsageError("give --split or --text, not both")
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}")
    settings = _dynamic_settings(dynamic_lr, dynamic_decay, dynamic_window) if dynamic else None
    raw = read_text(text, "--text", allow_empty=True) if text is not None else None
    if raw == "":
        raise CharlmError(f"--text {text} is empty: nothing to evaluate; give a file of at least 2 characters")

    loaded = load_model(checkpoint, impl, device, weights)
    from charlm.system.devices import set_tf32

    set_tf32(False)  # exact float32 figures on every GPU
    data = None  # the run's dataset, read once: the split evaluated and --dynamic's train split
    if text is not None:
        tokens = loaded.vocab.encode(preprocess(raw, loaded.preprocessing)).to(loaded.device)
        source, what = str(text), f"--text {text}"
    else:
        split = split or "val"
        data = run_data(loaded, split)
        tokens = getattr(data, split)
        source, what = f"{split} split", f"the {split} split of the run of {loaded.path}"
    if tokens.numel() < 2:
        raise CharlmError(
            f"{what} has {tokens.numel()} character{'s' if tokens.numel() != 1 else ''} after "
            "preprocessing: nothing to evaluate (a character is predicted from the ones before "
            "it, so at least 2 are needed)"
        )
    train = _training_split(loaded, data) if settings else None  # checked before any scoring
    result = perplexity_of(loaded.model, tokens, window=batch_size, threads=threads,
                           byte_vocab=loaded.vocab if loaded.preprocessing == "bytes" else None)
    adapted = _dynamic(loaded, tokens, settings, train, threads) if settings else None

    if json_out:
        payload = {"checkpoint": str(loaded.path), "split": None if text is not None else split,
                   "text": str(text) if text is not None else None, **result.to_dict(),
                   "impl": loaded.model.config.impl, "device": str(loaded.device),
                   "weights": _weights_used(loaded, weights)}
        if adapted is not None:
            payload["dynamic"] = {**adapted.to_dict(), **settings.to_dict(),
                                  "gain_nats_per_char": result.nats_per_char - adapted.nats_per_char}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    from rich.table import Table

    from charlm.system.console import console

    table = Table(title="charlm eval perplexity", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("checkpoint", str(loaded.path))
    table.add_row("evaluated on", source)
    table.add_row("perplexity", f"{result.perplexity:.4f}")
    table.add_row("nats / char", f"{result.nats_per_char:.4f}")
    table.add_row("bits / char", f"{result.bits_per_char:.4f}")
    table.add_row("characters evaluated", f"{result.characters:,}")
    if result.unit == "byte":  # a byte-level model: the figures above are per character
        table.add_row("perplexity is per", "byte")
        table.add_row("bits / byte", f"{result.bits_per_byte:.4f}")
        table.add_row("bytes evaluated", f"{result.bytes:,}")
    table.add_row("<unk> share", f"{result.unk_share:.4%} ({result.unk_characters:,})")
    if adapted is not None:
        table.add_row("dynamic perplexity", f"{adapted.perplexity:.4f}")
        table.add_row("dynamic nats / char",
                      f"{adapted.nats_per_char:.4f} ({adapted.nats_per_char - result.nats_per_char:+.4f})")
        table.add_row("dynamic bits / char", f"{adapted.bits_per_char:.4f}")
        table.add_row("dynamic settings", f"lr {settings.lr:g}, decay {settings.decay:g}, "
                                          f"window {settings.window}")
    console().print(table)


def _dynamic_settings(lr: float, decay: float, window: int):
    from charlm.checks import Rule
    from charlm.inference.dynamic import MAX_LR, DynamicSettings

    Rule(kind=float, low=0, high=MAX_LR).check("--dynamic-lr", lr)
    Rule(kind=float, low=0, high=1).check("--dynamic-decay", decay)
    Rule(kind=int, low=1).check("--dynamic-window", window)
    return DynamicSettings(lr=lr, decay=decay, window=window)


def _training_split(loaded: "Loaded", data) -> "torch.Tensor":
    """The run's training split, for --dynamic's gradient statistics: from `data` (the run's
    dataset, when the evaluated split came from it), else rebuilt."""
    from charlm.inference.splits import run_data

    if data is not None:
        return data.train
    if not isinstance(loaded.ckpt.get("train_config"), dict):
        raise CharlmError(f"--dynamic needs the run's training text (for its gradient statistics) "
                          f"but {loaded.path} holds no training configuration to rebuild it "
                          "from; evaluate without --dynamic")
    try:
        return run_data(loaded, "train").train
    except CharlmError as exc:
        raise CharlmError(f"--dynamic needs the run's training text: {exc}") from None


def _dynamic(loaded: "Loaded", tokens: "torch.Tensor", settings, train: "torch.Tensor",
             threads: int):
    """Dynamic evaluation of `tokens` on a copy of the model, its gradient statistics from the
    run's own training split `train`."""
    from charlm.inference.dynamic import adaptable, dynamic_perplexity, gradient_rms

    model = adaptable(loaded.model)
    rms = gradient_rms(model, train, settings.window, settings.stats_tokens)
    return dynamic_perplexity(model, tokens, settings, rms, threads,
                              loaded.vocab if loaded.preprocessing == "bytes" else None)


def _weights_used(loaded: "Loaded", asked: str) -> str:
    return "ema" if asked == "ema" or (asked == "auto" and loaded.ckpt.get("ema")) else "raw"
