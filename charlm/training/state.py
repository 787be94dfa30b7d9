"""A run's state between steps, as plain data, and how `--resume` finds the run to continue.

`Trainer.state_dict()` is the checkpoint: each part of the run contributes its own state
(the model, the optimizer, the LR schedule, the batch iterator, the counters below); this module
holds the pieces that belong to no part: the RNG states and the carried hidden state. All of it
is plain data (tensors, numbers, strings, lists, dicts), so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from charlm.errors import UsageError
from charlm.model.lm import State
from charlm.training.checkpoint import find_checkpoint, load_checkpoint
from charlm.training.config import LIMITS, TrainConfig, build_config, fixed_on_resume


@dataclass
class LoopState:
    """The training loop's counters (elapsed: training wall time across resumes, pauses for
    evaluation and checkpoints excluded)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan  # of this process's latest evaluation; not saved

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "best_val_loss": self.best_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed, self.best_val_loss = float(state["elapsed"]), float(state["best_val_loss"])


class LogWindow:
    """What happened since the last log line; the loss sum stays on the device."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.tokens, self.since = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.tokens, self.since = 0, 0, time.perf_counter()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def hidden_to_plain(state: State | None):
    """The carried state as CPU tensors: h, or [h, c] for an LSTM."""
    if state is None:
        return None
    return [s.detach().cpu() for s in state] if isinstance(state, tuple) else state.detach().cpu()


def hidden_from_plain(data, device) -> State | None:
    if data is None:
        return None
    return tuple(s.to(device) for s in data) if isinstance(data, list) else data.to(device)


def resolve_resume(given: dict, resume: str) -> tuple[TrainConfig, dict]:
    """The checkpoint's config, with the options given now (a config file's, then the command
    line's) laid over it; options that define the model or its data must agree with it. Limits
    go as a group: naming any (`--resume --max-steps 5000`) replaces the run's limits.

    Returns the config and {"path", "ckpt"} for `Trainer(cfg, resume=...)`."""
    target = None if resume == "latest" else resume
    path = find_checkpoint(target, prefer="last.pt",
                           how_to_name="name one: charlm train --resume RUN_DIR|CHECKPOINT")
    ckpt = load_checkpoint(path)
    saved = dict(ckpt.get("train_config") or {})
    fixed = fixed_on_resume()
    for key in fixed:
        if key in given and given[key] is not None and given[key] != saved.get(key):
            raise UsageError(
                f"--{key.replace('_', '-')} {given[key]} disagrees with the checkpoint "
                f"({saved.get(key)}) being resumed; drop the option or start a new run"
            )
    values = TrainConfig().to_dict()
    values.update({k: v for k, v in saved.items() if k in values})
    given = {k: v for k, v in given.items() if v is not None and k not in fixed}
    if any(k in given for k in LIMITS):  # as for a new run: the limits named now, only those
        values.update(epochs=0, max_steps=0, time_budget="0")
    values.update(given)
    values["out"] = str(path.parent)
    return build_config(values, {}), {"path": path, "ckpt": ckpt}
