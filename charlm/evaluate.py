"""Perplexity: the summed negative log-likelihood of every target position given its left context.

perplexity = exp(sum of -log p(target) / number of targets); nats and bits per character are the
same sum divided by the count (and by ln 2). The window layout comes from
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
from charlm.devices import stream_threads
from charlm.model.lm import CharLM, detach_state


@torch.no_grad()
def corpus_nll(model: CharLM, tokens: torch.Tensor, batch_size: int, num_steps: int,
               autocast=None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of tokens[1:] and the number of targets.

    batch_size 1 conditions every target on all of its left context (exact); B > 1 restarts
    the state at the start of each of the B streams (an estimate, see the module docstring).
    The sum stays on the device until the end (one host sync)."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    tokens = tokens.to(device)
    sums = WindowSums(tokens.numel(), batch_size, num_steps, device)
    state = None
    try:
        for X, Y, reset in eval_windows(tokens, batch_size, num_steps):
            if reset:
                state = None
            with autocast if autocast is not None else nullcontext():
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
    perplexity: float
    nats_per_char: float
    bits_per_char: float
    characters: int  # targets evaluated: every character but the first
    unk_characters: int  # of those, how many were <unk> (id 0)
    unk_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_of(model: CharLM, tokens: torch.Tensor, window: int = 512) -> Perplexity:
    """Exact: one stream, `window` characters per forward pass, the state carried throughout.

    On the CPU it runs on one thread: a single stream's products are too small to split, and a
    second thread turns every op into a wait for a core that a busy machine has given away
    (413 against 17,834 characters/s under load, issue 20)."""
    with stream_threads(model.head.weight.device):
        nll, count = corpus_nll(model, tokens, 1, window)
    nats = nll / count
    unk = int((tokens[1:] == 0).sum().item())
    return Perplexity(math.exp(nats), nats, nats / math.log(2), count, unk, unk / count)
