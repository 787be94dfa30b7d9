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
from charlm.model.lm import CharLM
from charlm.model.state import detach_state
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
    perplexity: float
    nats_per_char: float
    bits_per_char: float
    characters: int  # targets evaluated: every character but the first
    unk_characters: int  # of those, how many were <unk> (id 0)
    unk_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_of(model: CharLM, tokens: torch.Tensor, window: int = 512,
                  threads: int = 0) -> Perplexity:
    """Exact: one stream, `window` characters per forward pass, the state carried throughout.

    On the CPU the windows' threads are timed (`ThreadChooser.for_stream`): two threads run a
    256-unit model's windows faster than one on an idle machine, while beside busy processes one
    can be far faster (docs/BENCHMARKS.md, CPU threads). `threads` > 0 fixes the count (eval
    perplexity --threads)."""
    chooser = ThreadChooser.for_stream(model.head.weight.device, model.config.hidden, threads)
    nll, count = corpus_nll(model, tokens, 1, window, threads=chooser)
    nats = nll / count
    unk = int((tokens[1:] == 0).sum().item())
    return Perplexity(math.exp(nats), nats, nats / math.log(2), count, unk, unk / count)
