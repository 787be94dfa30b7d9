"""`charlm generate`: continue a prefix with a trained model, one character per step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.options import (CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt, QuietOpt, WeightsOpt,
                                say)
from charlm.errors import UsageError


def generate(
    prefix: Optional[str] = typer.Option(None, "--prefix", "-p", help="Text to continue (warms up the state). Default: none, start from a neutral state."),
    prefix_file: Optional[Path] = typer.Option(None, "--prefix-file", help="Read the prefix from this UTF-8 file (verbatim, newlines included)."),
    length: int = typer.Option(200, "--length", "-n", help="Characters to draw after the prefix."),
    temperature: float = typer.Option(1.0, "--temperature", help="Divide the logits by this (< 1: safer, > 1: wilder; 0, or below 1e-8, is --greedy)."),
    top_k: int = typer.Option(0, "--top-k", help="Draw only among the K likeliest characters (0: off, all of them)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Draw only among the smallest set of characters holding this much probability (nucleus; 1: off)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the likeliest character (d2l's predict_ch8); ignores temperature, top-k, top-p and seed."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text. Default: a fresh one (shown by --json)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Draw this many samples as one batch; printed after drawing, separated by a blank line."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam search with N beams instead of drawing: the likeliest continuations, scored by log-probability (natural log, per character; <unk> excluded and the other characters' probabilities renormalised, as when drawing). --beam 1 is --greedy; with --num-samples K, the K best beams. Ignores temperature, top-k, top-p and seed.", show_default=False),
    checkpoint: Optional[str] = CheckpointOpt,
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    weights: str = WeightsOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Generate text from a trained model.

    The prefix goes through the checkpoint's own preprocessing, warms up the hidden state, and
    characters are drawn one at a time. One sample streams to stdout as it is drawn; several
    are printed once drawn. A line on stderr names the model used (not with -q). --json prints
    {prefix, samples, settings, checkpoint, model}; each sample there is the continuation only
    (the text is prefix + sample). In Python: charlm.load(...).generate(...).

    Examples: charlm generate --prefix "time traveller" --length 300 --temperature 0.8;
    charlm generate --prefix "time traveller" --length 100 --beam 8
    """
    from charlm.data.text import read_text
    from charlm.inference.model import Model, check_settings

    if prefix is not None and prefix_file is not None:
        raise UsageError("give --prefix or --prefix-file, not both")
    options = dict(length=length, temperature=temperature, top_k=top_k, top_p=top_p, beam=beam,
                   seed=seed, num_samples=num_samples, greedy=greedy)
    check_settings(**options)  # before any checkpoint is read
    raw = (read_text(prefix_file, "--prefix-file", allow_empty=True) if prefix_file is not None
           else prefix or "")

    model = Model.load(checkpoint, device, impl, weights)
    if not quiet:
        say(f"using {model.describe()}")
    if num_samples == 1 and not json_out and beam is None:  # stream: a beam's best comes at the end
        out = sys.stdout
        for piece in model.stream(raw, settings=model.settings(**options)):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        return
    # several samples, a beam, or --json: drawn into a file, printed once all are done
    from charlm.cli.samples_out import write_json, write_text
    from charlm.system.spool import IdSpool

    mode, decode = model.preprocessing, model.vocab.decode
    with IdSpool(beam if beam is not None else num_samples) as spool:
        drawn = model.draw(raw, **options, spool=spool)
        columns = [spool.column(k) for k in range(num_samples)]
        if json_out:
            payload = {"prefix": drawn.prefix, "samples": None,
                       "settings": drawn.settings.to_dict(), "checkpoint": str(model.path)}
            if drawn.scores is not None:
                payload["settings"]["beam"] = beam
                payload["scores"] = drawn.scores
            payload["model"] = model.info()
            write_json(sys.stdout, payload, columns, decode, mode)
        else:
            write_text(sys.stdout, drawn.text, columns, decode, mode)
    sys.stdout.flush()
