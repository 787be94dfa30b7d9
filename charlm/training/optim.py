"""Optimizers and learning-rate schedules (plain-number state, so checkpoints stay plain data).

torch is imported where an optimizer is made: the names below are read by `charlm train --help`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from charlm.checks import Rule
from charlm.config.train import OPTIMIZERS

if TYPE_CHECKING:
    import torch



def make_optimizer(name: str, params, lr: float, weight_decay: float) -> "torch.optim.Optimizer":
    """SGD (d2l's choice, with lr 1 and clipping), Adam or AdamW.

    torch's fused implementation (one kernel per step for all parameters; faster than the
    default foreach one for a char-LM's few tensors on the CPU) where this torch and device offer
    it, else the default; both keep the same state, so checkpoints resume across them.
    """
    import torch

    Rule(choices=OPTIMIZERS).check("optimizer", name)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    params = list(params)
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # torch < 2.4 on CPU, or an unsupported dtype
            pass
    return cls(params, lr=lr, weight_decay=weight_decay)


# What an optimizer keeps per parameter: (every key it may hold, the keys it must hold).
_PER_PARAMETER = {
    "SGD": ({"momentum_buffer"}, set()),
    "Adam": ({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step", "exp_avg", "exp_avg_sq"}),
}
_PER_PARAMETER["AdamW"] = _PER_PARAMETER["Adam"]


def load_optimizer_state(optimizer: "torch.optim.Optimizer", saved: dict, where: str) -> None:
    """Restore a checkpoint's optimizer state into `optimizer`, every tensor checked against its
    parameter first: torch checks none of them, and the fused kernels write a state tensor of
    the wrong shape out of bounds. The hyperparameters (lr, betas, weight decay, fused, ...)
    stay the optimizer's own, made from the run's configuration; only the per-parameter state
    comes from the file. Raises a one-line CharlmError naming `where` (the checkpoint)."""
    import torch

    from charlm.errors import CharlmError

    def damaged(problem: str) -> CharlmError:
        return CharlmError(f"{where}: its 'optimizer' entry {problem}; the file is damaged or "
                           "was edited")

    groups, state = saved.get("param_groups"), saved.get("state")
    if not (isinstance(groups, list) and isinstance(state, dict) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise damaged("lacks its 'state' and 'param_groups'")
    ours = optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise damaged(f"has groups of {[len(g['params']) for g in groups]} parameters, but the "
                      f"model's optimizer has {[len(g['params']) for g in ours]}")
    ids = [i for g in groups for i in g["params"]]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or len(set(ids)) < len(ids):
        raise damaged("names its parameters other than by distinct numbers")
    params = dict(zip(ids, (p for g in ours for p in g["params"])))
    allowed, required = _PER_PARAMETER.get(type(optimizer).__name__, (set(), set()))
    for key, entry in state.items():
        if key not in params or not isinstance(entry, dict):
            raise damaged(f"holds state for an unknown parameter {key!r}")
        if not set(entry) <= allowed or not required <= set(entry):
            raise damaged(f"holds {sorted(map(str, entry))} for parameter {key}, not a "
                          f"{type(optimizer).__name__} state ({', '.join(sorted(allowed))})")
        param = params[key]
        for name, value in entry.items():
            want = () if name == "step" else tuple(param.shape)
            if value is None and name == "momentum_buffer":
                continue
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                    and tuple(value.shape) == want):
                shown = (f"a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                         f"{tuple(value.shape)}" if isinstance(value, torch.Tensor)
                         else type(value).__name__)
                raise damaged(f"holds {name} of parameter {key} as {shown}; it must be a float "
                              f"tensor of shape {want}")
            if not bool(torch.isfinite(value).all()) or (
                    name in ("step", "exp_avg_sq", "max_exp_avg_sq") and bool((value < 0).any())):
                raise damaged(f"holds {name} of parameter {key} with values no optimizer makes")
    current = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({
        "state": state,
        "param_groups": [{**mine, "params": g["params"]} for mine, g in zip(current, groups)],
    })


class LRSchedule:
    """The learning rate as a function of training progress.

    none     lr = base
    cosine   linear warm-up over `warmup` steps, then cosine decay to `floor` x base as progress
             goes 0 -> 1 (progress = the furthest-along of the step, epoch and time limits, so
             the decay ends where the run ends whichever limit stops it)
    plateau  lr = base x factor^k, k growing by one each time validation loss has not improved
             for `patience` evaluations in a row
    """

    def __init__(self, kind: str, base_lr: float, warmup: int = 0, factor: float = 0.5,
                 patience: int = 2, floor: float = 0.05):
        self.kind, self.base_lr, self.warmup = kind, base_lr, warmup
        self.factor, self.patience, self.floor = factor, patience, floor
        self.scale = 1.0
        self.best = math.inf
        self.bad_evals = 0

    def lr(self, step: int, progress: float) -> float:
        if self.kind == "cosine":
            if self.warmup and step < self.warmup:
                return self.base_lr * (step + 1) / self.warmup
            p = min(max(progress, 0.0), 1.0)
            return self.base_lr * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * p)))
        return self.base_lr * self.scale

    def observe(self, val_loss: float) -> None:
        """Feed a validation loss (plateau only: decay when it stops improving)."""
        if self.kind != "plateau":
            return
        if val_loss < self.best * (1 - 1e-4):
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                self.scale *= self.factor
                self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
