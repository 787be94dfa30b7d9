"""Drawing text from a trained char-LM.

d2l's `predict_ch8` order: run the prefix through the model once to warm up the hidden state,
then draw one character at a time, feeding each back in. Each new character costs exactly one
step of the recurrent layers; the prefix is never re-run. Several samples are drawn as one
batch (the warmed-up state is copied into each row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from charlm.errors import UsageError
from charlm.models import CharLM, State


@dataclass
class SampleSettings:
    length: int = 200
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    num_samples: int = 1
    seed: int | None = None

    def validate(self) -> "SampleSettings":
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length <= 0:
            raise UsageError(f"--length must be a positive integer, got {self.length}")
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise UsageError(f"--temperature must be a positive number, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 1 (or 0 for off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1, got {self.num_samples}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _expand(state: State, n: int) -> State:
    if isinstance(state, tuple):
        return tuple(s.expand(-1, n, -1).contiguous() for s in state)
    return state.expand(-1, n, -1).contiguous()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the top-k logits and/or the smallest nucleus of mass >= top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: CharLM,
    prefix_ids: list[int],
    settings: SampleSettings,
    on_step: Callable[[list[int]], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Token ids drawn after `prefix_ids`, one list per sample (the prefix is not included).

    `on_step` receives the ids drawn at each step (one per sample), for streaming output.
    An empty prefix starts from the zero state, the first character drawn from the output
    layer's bias alone.
    """
    settings.validate()
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    n = settings.num_samples
    if generator is None and settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    try:
        if prefix_ids:
            x = torch.tensor([prefix_ids], dtype=torch.long, device=device)
            logits, state = model(x)
            logits, state = logits[:, -1], _expand(state, n)
            logits = logits.expand(n, -1)
        else:
            state = model.begin_state(n, device)
            logits = model.head.bias.expand(n, -1)
        out: list[list[int]] = [[] for _ in range(n)]
        for step in range(settings.length):
            if settings.greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(
                    filter_logits(logits.float() / settings.temperature, settings.top_k,
                                  settings.top_p), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            ids = nxt.tolist()
            for row, i in zip(out, ids):
                row.append(i)
            if on_step is not None:
                on_step(ids)
            if step == settings.length - 1:
                break  # no model step for a character nobody will draw after
            logits, state = model(nxt[:, None], state)
            logits = logits[:, -1]
        return out
    finally:
        model.train(was_training)
