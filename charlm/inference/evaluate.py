"""Perplexity: the summed negative log-likelihood of every target position given its left context.

perplexity = exp(sum of -log p(target) / number of targets); nats and bits per character are the
same sum divided by the count (and by ln 2). For a byte-level model a target is a byte: the
perplexity and bits per byte are per target, the figures per character divide the same sum by
the characters the bytes decode to as UTF-8. The window layout comes from
`charlm.data.batches.eval_windows`.

Only one stream is exact: with batch_size B > 1 the text is cut into B streams that each start
from a zero state, so the first characters of streams 2..B lose their left context and the
result depends on B (a fast estimate, what the trainer's validation uses). `perplexity_of` runs
one stream, the state carried across windows, so its result depends on the window length only
through float rounding.

No float64 on the device (Apple's MPS has none): each window's loss is summed in float32 on the
device, into a float32 vector with one entry per window, and the windows' sums are added in
double precision on the host once, at the end (math.fsum of the vector's values).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from charlm.data.batches import eval_windows
from charlm.model.lm import CharLM, detach_state
from charlm.system.threads import ThreadChooser, threads_within


@torch.no_grad()
def corpus_nll(model: CharLM, tokens: torch.Tensor, batch_size: int, num_steps: int,
               autocast=None, threads: ThreadChooser | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens[1:] and the number of targets.

    batch_size 1 conditions every target on all of its left context (exact); B > 1 restarts
    the state at the start of each of the B streams (an estimate, see the module docstring).
    The sum stays on the device until the end (one host sync). `threads` chooses the CPU
    threads of each window (the count before comes back after)."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    tokens = tokens.to(device)
    sums = WindowSums(tokens.numel(), batch_size, num_steps, device)
    state = None
    try:
        with threads_within(torch.get_num_threads()):
            for X, Y, reset in eval_windows(tokens, batch_size, num_steps):
                if reset:
                    state = None
                with threads.step() if threads else nullcontext(), \
                        autocast if autocast is not None else nullcontext():
                    logits, state = model(X, state)
                    state = detach_state(state)
                    sums.add(logits, Y)
    finally:
        model.train(was_training)
    return sums.total(), sums.count


class WindowSums:
    """Per-window float32 loss sums on the device (no sync per window); `total()` adds them in
    double precision on the host."""

    def __init__(self, num_tokens: int, batch_size: int, num_steps: int, device):
        windows = -(-max(num_tokens - 1, 0) // max(batch_size * num_steps, 1)) + 2  # >= needed
        self.sums = torch.zeros(windows, dtype=torch.float32, device=device)
        self.index = self.count = 0

    def add(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The window's summed loss (float32, on the device, attached to the graph)."""
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), Y.reshape(-1),
                               reduction="sum")
        if self.index == self.sums.numel():
            self.sums = torch.cat([self.sums, torch.zeros_like(self.sums)])
        self.sums[self.index] = loss.detach()
        self.index += 1
        self.count += Y.numel()
        return loss

    def total(self) -> float:
        return math.fsum(self.sums[: self.index].tolist())  # the one host sync


@dataclass
class Perplexity:
    """One evaluation's figures. For a character-level model a token is a character. For a
    byte-level one (`--preprocessing bytes`) a token is a byte: `perplexity` is per byte, and
    the figures per character divide the same nats by the characters the bytes decode to."""

    perplexity: float  # per token: per character, or per byte (`unit`)
    nats_per_char: float
    bits_per_char: float
    characters: int  # characters predicted: the targets (every token but the first), as text
    unk_characters: int  # targets that were <unk> (id 0)
    unk_share: float  # of the targets
    unit: str = "char"  # what a token is: "char", or "byte" for a byte-level model
    bytes: int | None = None  # a byte-level model's targets
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        """The figures; a byte-level model's with `unit`, `bytes` and `bits_per_byte`."""
        d = asdict(self)
        if self.unit == "char":
            for key in ("unit", "bytes", "bits_per_byte"):
                del d[key]
        return d


def utf8_characters(tokens: torch.Tensor, vocab) -> int:
    """How many characters the bytes a byte-level `vocab` gives `tokens` decode to as UTF-8 (a
    byte that starts no valid sequence counts as one, as U+FFFD; <unk> as one)."""
    values = torch.tensor([ord(t) if len(t) == 1 else 0x3F for t in vocab.tokens],
                          dtype=torch.uint8)
    raw = values[tokens.to("cpu", torch.int64)].numpy().tobytes()
    return len(raw.decode("utf-8", errors="replace"))


def perplexity_from(nats: float) -> float:
    """exp(nats), or inf where that overflows float64 (past about 709.8 nats): weights within
    the checks' bounds can still give a loss of thousands of nats, reported, not a crash."""
    try:
        return math.exp(nats)
    except OverflowError:
        return math.inf


def figures(nats: float, count: int, unk: int, characters: int | None = None) -> Perplexity:
    """The figures of `nats` summed over `count` targets; `characters` given: the targets are
    bytes that decode to that many characters."""
    per_token = nats / count
    if characters is None:
        return Perplexity(perplexity_from(per_token), per_token, per_token / math.log(2), count,
                          unk, unk / count)
    per_char = nats / max(characters, 1)
    return Perplexity(perplexity_from(per_token), per_char, per_char / math.log(2), characters,
                      unk, unk / count, "byte", count, per_token / math.log(2))


def perplexity_of(model: CharLM, tokens: torch.Tensor, window: int = 512,
                  threads: int = 0, byte_vocab=None) -> Perplexity:
    """Exact: one stream, `window` characters per forward pass, the state carried throughout.
    `byte_vocab`: the vocabulary of a byte-level model (`tokens` are bytes): figures per byte
    and per character.

    On the CPU the windows' threads are timed (`ThreadChooser.for_stream`): two threads run a
    256-unit model's windows 1.4-1.6x faster than one on an idle machine, while beside busy
    processes one can be the faster (issue 20: a fixed two threads once ran 413 against 17,834
    characters/s with one). `threads` > 0 fixes the count (eval perplexity --threads)."""
    chooser = ThreadChooser.for_stream(model.head.weight.device, model.config.hidden, threads)
    nll, count = corpus_nll(model, tokens, 1, window, threads=chooser)
    unk = int((tokens[1:] == 0).sum().item())
    chars = utf8_characters(tokens[1:], byte_vocab) if byte_vocab is not None else None
    return figures(nll, count, unk, chars)
