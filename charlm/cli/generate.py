"""`charlm generate`: continue a prefix with a trained model, one character per step."""

from __future__ import annotations

import codecs
import secrets
import sys
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.options import CheckpointOpt, DeviceOpt, ImplOpt, JsonOpt, WeightsOpt
from charlm.errors import UsageError, warn


def generate(
    prefix: Optional[str] = typer.Option(None, "--prefix", "-p", help="Text to continue (warms up the state). Default: none, start from a neutral state."),
    prefix_file: Optional[Path] = typer.Option(None, "--prefix-file", help="Read the prefix from this UTF-8 file (verbatim, newlines included)."),
    length: int = typer.Option(200, "--length", "-n", help="Characters to draw after the prefix."),
    temperature: float = typer.Option(1.0, "--temperature", help="Divide the logits by this (< 1: safer, > 1: wilder; below 1e-8 it is --greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Draw only among the K likeliest characters."),
    top_p: float = typer.Option(1.0, "--top-p", help="Draw only among the smallest set of characters holding this much probability (nucleus)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the likeliest character (d2l's predict_ch8); ignores temperature, top-k, top-p and seed."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text. Default: a fresh one (shown by --json)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Draw this many samples as one batch; printed after drawing, separated by a blank line."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam search with N beams instead of drawing: the likeliest continuations, scored by log-probability (natural log, per character; <unk> excluded and the other characters' probabilities renormalised, as when drawing). --beam 1 is --greedy; with --num-samples K, the K best beams. Ignores temperature, top-k, top-p and seed.", show_default=False),
    checkpoint: Optional[str] = CheckpointOpt,
    impl: Optional[str] = ImplOpt,
    device: str = DeviceOpt,
    weights: str = WeightsOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Generate text from a trained model.

    The prefix goes through the checkpoint's own preprocessing, warms up the hidden state, and
    characters are drawn one at a time. One sample streams to stdout as it is drawn; several
    are printed once drawn. --json prints {prefix, samples, settings, checkpoint}; each
    sample there is the continuation only (the text is prefix + sample).

    Examples: charlm generate --prefix "time traveller" --length 300 --temperature 0.8;
    charlm generate --prefix "time traveller" --length 100 --beam 8
    """
    from charlm.data.text import preprocess, read_text, readable
    from charlm.inference.loading import load_model
    from charlm.inference.sample import SampleSettings
    from charlm.inference.sample import generate as draw

    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    settings = SampleSettings(length=length, temperature=temperature, top_k=top_k or 0,
                              top_p=top_p, greedy=greedy, num_samples=num_samples, seed=seed)
    settings.validate()
    if prefix is not None and prefix_file is not None:
        raise UsageError("give --prefix or --prefix-file, not both")
    if beam is not None:
        if beam < 1:
            raise UsageError(f"--beam must be >= 1, got {beam}")
        if greedy:
            raise UsageError("give --greedy or --beam, not both (--beam 1 is greedy)")
        if num_samples > beam:
            raise UsageError(f"--num-samples {num_samples} asks for more of the best beams than "
                             f"--beam {beam} keeps; use --num-samples <= --beam")
    raw = (read_text(prefix_file, "--prefix-file", allow_empty=True) if prefix_file is not None
           else prefix or "")

    loaded = load_model(checkpoint, impl, device, weights)
    vocab = loaded.vocab
    if beam is not None and beam > len(vocab) - 1:  # <unk> is never a continuation
        raise UsageError(f"--beam {beam} is more than the {len(vocab) - 1} symbols a continuation "
                         f"can use (the model's vocabulary less <unk>); use --beam "
                         f"{len(vocab) - 1} or less")
    text = preprocess(raw, loaded.preprocessing)
    unknown = [c for c in dict.fromkeys(text) if c not in vocab]
    if unknown:
        what = "byte" if loaded.preprocessing == "bytes" else "character"  # bytes: as hex
        shown = [f"0x{ord(c):02x}" if what == "byte" else repr(c) for c in unknown]
        warn(f"{len(unknown)} prefix {what}{'s' if len(unknown) > 1 else ''} not in the "
             f"model's vocabulary, read as <unk>: {', '.join(shown)}")
    ids = vocab.encode(text).tolist()
    if not greedy and beam is None and settings.seed is None:
        settings.seed = secrets.randbits(63)  # reported by --json so the text can be redrawn

    stream = num_samples == 1 and not json_out and beam is None  # a beam's best is known at the end
    tokens, out, mode = vocab.tokens, sys.stdout, loaded.preprocessing
    # a byte-level model's bytes become text as they complete a UTF-8 sequence
    utf8 = codecs.getincrementaldecoder("utf-8")("replace") if mode == "bytes" else None

    def show(piece: str) -> str:
        return utf8.decode(piece.encode("latin-1", "replace")) if utf8 else piece

    def write_char(step_ids: list[int]) -> None:
        out.write(show(tokens[step_ids[0]]))
        out.flush()

    on_step = write_char if stream else None
    if stream:
        out.write(show(text))
        out.flush()

    if stream:
        draw(loaded.model, ids, settings, on_step=on_step, keep=False)
        sys.stdout.write((utf8.decode(b"", final=True) if utf8 else "") + "\n")
        sys.stdout.flush()
        return
    # several samples, a beam, or --json: drawn into a file, printed once all are done
    from charlm.cli.samples_out import write_json, write_text
    from charlm.system.spool import IdSpool

    with IdSpool(beam if beam is not None else num_samples) as spool:
        scores = None
        if beam is not None:
            from charlm.inference.beam import beam_search

            best = beam_search(loaded.model, ids, beam, length, spool=spool)[:num_samples]
            scores = [{"log_prob": h.log_prob, "nats_per_char": -h.score} for h in best]
            settings.seed = None
        else:
            draw(loaded.model, ids, settings, spool=spool, keep=False)
        columns = [spool.column(k) for k in range(num_samples)]
        if json_out:
            payload = {"prefix": readable(text, mode), "samples": None,
                       "settings": settings.to_dict(), "checkpoint": str(loaded.path)}
            if scores is not None:
                payload["settings"]["beam"] = beam
                payload["scores"] = scores
            write_json(sys.stdout, payload, columns, vocab.decode, mode)
        else:
            write_text(sys.stdout, text, columns, vocab.decode, mode)
    sys.stdout.flush()
