"""Exact perplexity: one sequential pass over every target position, state carried.

perplexity = exp(sum of -log p(target) / number of targets); nats and bits per character are the
same sum divided by the count (and by ln 2). The window layout comes from
`charlm.batches.eval_windows`, so the result does not depend on --batch-size beyond float
rounding.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from charlm.batches import eval_windows
from charlm.models import CharLM, detach_state


@torch.no_grad()
def corpus_nll(model: CharLM, tokens: torch.Tensor, batch_size: int, num_steps: int,
               autocast=None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats, float64) of tokens[1:] given their left context,
    and the number of targets. The sum stays on the device until the end (one host sync)."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    tokens = tokens.to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state = None
    try:
        for X, Y, reset in eval_windows(tokens, batch_size, num_steps):
            if reset:
                state = None
            with autocast if autocast is not None else nullcontext():
                logits, state = model(X, state)
            state = detach_state(state)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), Y.reshape(-1),
                                     reduction="sum")
            count += Y.numel()
    finally:
        model.train(was_training)
    return total.item(), count


@dataclass
class Perplexity:
    perplexity: float
    nats_per_char: float
    bits_per_char: float
    characters: int
    unk_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_of(model: CharLM, tokens: torch.Tensor, batch_size: int = 32,
                  num_steps: int = 256) -> Perplexity:
    nll, count = corpus_nll(model, tokens, batch_size, num_steps)
    nats = nll / count
    unk = (tokens[1:] == 0).sum().item() / count
    return Perplexity(math.exp(nats), nats, nats / math.log(2), count, unk)
