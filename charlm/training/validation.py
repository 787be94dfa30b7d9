"""A run's two kinds of validation figure, and the metrics rows that carry them.

    estimate  every --eval-every steps: --batch-size streams from a zero state over the first
              --eval-tokens of the validation split, under the run's --precision. Quick, and
              the same part each time, so the figures compare with each other (they pick
              best.pt and drive --schedule plateau), but a stream's first characters lose their
              left context: they are not the model's perplexity.
    exact     once, at the end of the run: best.pt read back from disk as `charlm eval
              perplexity` reads it, and scored by the same function (`perplexity_of`: one
              stream over all of the split, the state carried, float32, no TF32). The summary's
              figure is therefore the one `charlm eval perplexity RUN_DIR` prints.

metrics.jsonl rows of kind "val" say which they are: `"val_kind": "estimate"` or `"exact"` (with
`"checkpoint": "best.pt"`, the file it scored). For a byte-level model (`--preprocessing bytes`) a
token is a byte: the rows and the summary give bits per byte and bits per character (the same
nats over the characters the bytes decode to as UTF-8) apart.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from charlm.data.dataset import Dataset
from charlm.inference.evaluate import Perplexity, perplexity_of, utf8_characters
from charlm.inference.loading import load_model
from charlm.system.devices import set_tf32

SCORED = "best.pt"  # the checkpoint the exact figure is of: what `eval perplexity RUN_DIR` loads


def exact(run_dir: Path, data: Dataset, device: torch.device) -> Perplexity:
    """`charlm eval perplexity --checkpoint RUN_DIR/best.pt` on the validation split: the file
    loaded back (its averaged weights where it has them), one stream, float32."""
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: the
        # run's generator stays as the last step left it, which last.pt saves for a resume
        loaded = load_model(run_dir / SCORED, None, str(device), "auto")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)
    try:
        return perplexity_of(loaded.model, data.val.to(loaded.device),
                             byte_vocab=data.vocab if data.preprocessing == "bytes" else None)
    finally:
        set_tf32(tf32)


class EstimateUnits:
    """Per-character figures of an estimate over a byte-level model's validation part: the
    characters per byte of that part, counted once."""

    def __init__(self, data: Dataset, tokens: int):
        self.ratio = None
        if data.preprocessing == "bytes" and tokens >= 2:
            part = data.val[:tokens]
            self.ratio = utf8_characters(part[1:], data.vocab) / (part.numel() - 1)

    def figures(self, loss: float) -> dict:
        """The row's bits: per character (`bpc`), and per byte for a byte-level model."""
        if not math.isfinite(loss):
            return {"bpc": None} if self.ratio is None else {"bpc": None, "bits_per_byte": None}
        bits = loss / math.log(2)
        if self.ratio is None:
            return {"bpc": bits}
        return {"bpc": bits / self.ratio, "bits_per_byte": bits}


def exact_row(result: Perplexity) -> dict:
    """The end's row: the exact figures of best.pt (`loss`: nats per token, as in every row)."""
    nats = result.nats_per_char if result.unit == "char" else result.bits_per_byte * math.log(2)
    row = {"loss": nats, "ppl": result.perplexity, "bpc": result.bits_per_char}
    if result.unit == "byte":
        row.update(bits_per_byte=result.bits_per_byte, bytes=result.bytes)
    return {**row, "characters": result.characters, "whole_split": True, "val_kind": "exact",
            "checkpoint": SCORED}


def row(trainer, loss: float) -> dict:
    """What every "val" row of `trainer` (a `charlm.training.trainer.Trainer`) says first."""
    loop = trainer.loop
    return {"kind": "val", "step": loop.step, "epoch": trainer.batches.epoch,
            "tokens": loop.tokens_seen, "time": round(loop.elapsed, 3), "loss": loss,
            "ppl": math.exp(min(loss, 50)) if math.isfinite(loss) else None}


def exact_evaluation(trainer, metrics) -> dict | None:
    """The end's figure: best.pt scored as `charlm eval perplexity` scores it, on rank 0, its
    row written and shown (a stop request cuts it short: the resumed run does it, and only it)."""
    loop, g = trainer.loop, trainer.group
    # no best.pt: no evaluation ever gave a finite loss, so there is nothing to score (and the
    # final save says how the run diverged)
    if trainer.data.val.numel() < 2 or not g.broadcast((trainer.run_dir / SCORED).exists()):
        return None
    began = time.perf_counter()
    loop.eval_pending = "whole"
    with trainer.requests.abandonable(allowed=not g.active):
        result = g.on_main(lambda: exact(trainer.run_dir, trainer.data, trainer.device))
    loop.eval_pending = None
    scored = g.broadcast({**row(trainer, math.nan), **exact_row(result),
                          "eval_s": round(time.perf_counter() - began, 3)}
                         if result is not None else None)
    metrics.write(scored)
    trainer.board.write(scored)
    trainer.display.exact(scored)
    return scored
