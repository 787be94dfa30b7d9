"""`charlm export`: a trained model as a folder to share (safetensors, config.json, a model card)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.options import DeviceOpt, JsonOpt, QuietOpt, WeightsOpt, say


def export(
    target: Optional[str] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT]", help="The run directory (its best.pt) or checkpoint to export. Default: the latest run's best.pt.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (new or empty; an earlier export there is replaced only with --force).", show_default=False),
    fmt: str = typer.Option("safetensors", "--format", metavar="[safetensors|onnx]", help="safetensors: model.safetensors + config.json + README.md; onnx: also model.onnx, the one-character step for ONNX runtimes (needs pip install 'charlm-rnn[onnx]')."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in --out."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Prompt of the card's sample. Default: the run's --sample-prefix, else its corpus's prompt.", show_default=False),
    sample_length: int = typer.Option(300, "--sample-length", help="Characters in the card's sample."),
    seed: int = typer.Option(0, "--seed", help="Seed of the card's sample (the card shows the command that draws it again)."),
    device: str = DeviceOpt,
    weights: str = WeightsOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export a trained model to a folder anyone can use: weights in model.safetensors (no
    pickle), config.json (sizes, vocabulary, preprocessing), and README.md, a model card with the
    exact validation perplexity and bits per character and a sample. charlm generate and charlm
    eval perplexity take the folder wherever they take a checkpoint (--checkpoint DIR).

    A line on stderr names the model exported, others its progress (not with -q). In Python:
    charlm.load(...).save_pretrained(DIR).

    Examples: charlm export --out share/gru-timemachine; charlm export runs/my-run --out
    share/my-run --format onnx
    """
    from charlm.inference.export import check_export
    from charlm.inference.model import Model

    check_export(out, fmt.lower(), force, sample_length)  # before any checkpoint is read
    model = Model.load(target, "cpu", "auto", weights,
                       how_to_name="name one: charlm export RUN_DIR --out DIR")
    result = model.save_pretrained(out, fmt, force, prefix, sample_length, seed, device,
                                   (lambda line: None) if quiet else say)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return
    ev = result.evaluation
    figures = (f"validation perplexity {ev['perplexity']:.4f}, {ev['bits_per_char']:.4f} bits/char"
               if ev else "no validation figures")
    files = ", ".join(f"{name} ({size:,} bytes)" for name, size in result.files.items())
    sys.stdout.write(f"wrote {result.folder}/: {files}; {figures}\n")
    sys.stdout.write(f"use it: charlm generate --checkpoint {result.folder} --prefix \"...\"\n")
