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


def load_optimizer_state(optimizer: "torch.optim.Optimizer", saved: dict, where: str) -> None:
    """Restore a checkpoint's optimizer state into `optimizer`, every tensor checked against its
    parameter first (`charlm.artifacts.optimstate.check_optimizer_state`): torch checks none of
    them, and the fused kernels write a state tensor of the wrong shape out of bounds. The
    hyperparameters (lr, betas, weight decay, fused, ...) stay the optimizer's own, made from
    the run's configuration; only the per-parameter state comes from the file."""
    from charlm.artifacts.optimstate import check_optimizer_state

    check_optimizer_state(saved, [g["params"] for g in optimizer.param_groups],
                          type(optimizer).__name__, where)
    current = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({
        "state": saved["state"],
        "param_groups": [{**mine, "params": g["params"]}
                         for mine, g in zip(current, saved["param_groups"])],
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
