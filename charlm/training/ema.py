"""Averaged weights (`--ema DECAY`): an exponential moving average of the parameters.

After every optimizer step t = 1, 2, ...::

    avg <- d_t * avg + (1 - d_t) * w        d_t = min(DECAY, (1 + t) / (10 + t))

The ramp in d_t (as TensorFlow's ExponentialMovingAverage with num_updates) keeps the first
steps from dragging the random initialisation along for ~1/(1 - DECAY) steps. The averaged
weights are what validation measures, so best.pt is the best *averaged* model, and what
`generate` and `eval` load (`charlm.inference.loading`); training keeps stepping the raw weights,
which the checkpoint holds beside the average, so a resumed run continues exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from charlm.artifacts.fields import check_parameters
from charlm.errors import CharlmError


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.updates = model, float(decay), 0
        self.params = list(model.parameters())  # a tied weight once
        with torch.no_grad():
            self.avg = [p.detach().clone() for p in self.params]

    def factor(self) -> float:
        """d_t of the next update."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; one fused op over all tensors, no host sync."""
        weight = 1.0 - self.factor()
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], weight)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The averaged weights in the model while the block runs, the raw ones after, whatever
        ends it (even part-way through copying the average in). A stop request must not cut the
        copies short: the trainer enters this outside `StopRequests.abandonable()`."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, a in zip(self.params, self.avg):
                    p.copy_(a)
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        """{"decay", "updates", "model": a state dict of the averaged weights}, named as the
        model's own (a tied weight under both its names)."""
        index = {id(p): a for p, a in zip(self.params, self.avg)}
        weights = {name: index[id(t)] if id(t) in index else t.detach()
                   for name, t in self.model.state_dict(keep_vars=True).items()}
        return {"decay": self.decay, "updates": self.updates, "model": weights}

    def load_state_dict(self, state: object, where: str = "checkpoint") -> None:
        """Continue a checkpoint's average (its weights checked as the model's are)."""
        if not isinstance(state, dict) or not isinstance(state.get("updates"), int) \
                or isinstance(state.get("updates"), bool) or state["updates"] < 0:
            raise CharlmError(f"{where}: its 'ema' entry is damaged (no update count); "
                              "use another checkpoint")
        check_parameters(where, self.model, state.get("model"))
        saved = state["model"]
        names = {id(p): name for name, p in self.model.named_parameters()}
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                a.copy_(saved[names[id(p)]])
        self.updates = state["updates"]
