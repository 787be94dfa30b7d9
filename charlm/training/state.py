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

from charlm.artifacts.checkpoint import find_checkpoint, load_checkpoint
from charlm.config.build import LIMITS, build_config
from charlm.config.train import OPTIONS, TrainConfig, absolute_files, canonical, fixed_on_resume
from charlm.data.transfer import public_url
from charlm.errors import CharlmError, UsageError
from charlm.model.lm import State


@dataclass
class LoopState:
    """The training loop's counters (elapsed: training wall time across resumes, pauses for
    evaluation and checkpoints excluded)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    best_val_loss: float = math.inf
    eval_pending: str | None = None  # the evaluation of this step a stop request cut short:
    # "periodic" (over --eval-tokens, with its sample) or "whole" (the end's exact pass of best.pt)
    last_val_loss: float = math.nan  # of this process's latest evaluation; not saved
    evaluated_at: int = -1  # the step of that evaluation; not saved

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "best_val_loss": self.best_val_loss, "eval_pending": self.eval_pending or False}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed, self.best_val_loss = float(state["elapsed"]), float(state["best_val_loss"])
        pending = state.get("eval_pending")  # older checkpoints: true, for the periodic one
        self.eval_pending = "periodic" if pending is True else pending or None


class LogWindow:
    """What happened since the last log line; the loss sum stays on the device."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.tokens, self.since = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens

    def pause(self, start: float, end: float) -> None:
        """Time from `start` to `end` (perf_counter) was no training: the window's start moves
        on by the part of it that fell in the window, so its steps keep their own time."""
        self.since += end - max(self.since, start)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.tokens, self.since = 0, 0, time.perf_counter()


def rng_state(device: torch.device) -> dict:
    """The generators a run draws from: torch's CPU one, the training device's own (a CUDA
    device's, cuda:N's and no other, or MPS's), and Python's."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["device"], state["device_rng"] = "cuda", torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["device"], state["device_rng"] = "mps", torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device, needed: bool = True) -> str | None:
    """Restore `state` (torch's, Python's and the device's generators) for a run on `device`;
    the reason, as one line, when the device's own generator cannot be restored (`needed`:
    whether the run draws from it, i.e. uses dropout).

    Checkpoints before the "device" key kept every GPU's state in a list ("cuda"): the training
    device's entry is used when there is one.
    """
    torch.set_rng_state(state["torch"])
    if state.get("python") is not None:  # plain ints in the file (torch.load weights_only)
        random.setstate((random.Random.VERSION, tuple(state["python"]), None))
    saved_on = state.get("device") or ("cuda" if state.get("cuda") else "cpu")
    if device.type == "cpu":
        if needed and saved_on != "cpu":
            return (f"the checkpoint was trained on {saved_on}, so its dropout masks came from "
                    f"that device's generator: resumed on the CPU, the run draws other masks than "
                    f"an uninterrupted run would")
        return None
    saved = state.get("device_rng") if saved_on == device.type else None
    legacy = state.get("cuda") if device.type == "cuda" else None
    if saved is None and isinstance(legacy, list):
        index = device.index if device.index is not None else torch.cuda.current_device()
        saved = legacy[index] if index < len(legacy) else None
    try:
        if isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8:
            if device.type == "cuda":
                torch.cuda.set_rng_state(saved.cpu(), device)
            else:
                torch.mps.set_rng_state(saved.cpu())
            return None
    except (RuntimeError, ValueError):
        pass
    if not needed:
        return None
    return (f"the checkpoint holds no usable {device.type} generator state (trained on "
            f"{saved_on}): from here on the run draws other dropout masks than an uninterrupted "
            f"run would")


def hidden_to_plain(state: State | None):
    """The carried state as float32 CPU tensors: h, or [h, c] for an LSTM. float32 whatever the
    precision it was computed in, so a run resumes under any --precision and on any device."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return [s.detach().float().cpu() for s in state]
    return state.detach().float().cpu()


def hidden_from_plain(data, device) -> State | None:
    """The carried state on `device`, float32 (checkpoints before that stored an fp16 run's in
    fp16, which a float32 model refuses)."""
    if data is None:
        return None
    if isinstance(data, list):
        return tuple(s.to(device=device, dtype=torch.float32) for s in data)
    return data.to(device=device, dtype=torch.float32)


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
    try:  # the file's own configuration must be one charlm could have run
        build_config({k: v for k, v in saved.items() if k in OPTIONS}, {})
    except UsageError as exc:
        raise CharlmError(f"{path}: its 'train_config' entry is invalid ({exc}); the file is "
                          "damaged or was edited") from None
    fixed = fixed_on_resume()
    for key in fixed:  # compared as the checkpoint recorded them
        value = _as_recorded(key, given.get(key))
        if value is not None and value != saved.get(key):
            raise UsageError(
                f"--{key.replace('_', '-')} {value} disagrees with the checkpoint "
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


def _as_recorded(key: str, value):
    """A value given for option `key` as a run records it (`TrainConfig.record_source`,
    `build_config`): --text files absolute, a URL without its user:password@, a choice in
    lower case."""
    if key == "text" and isinstance(value, list):
        return absolute_files(value)
    if key == "url" and isinstance(value, str):
        return public_url(value)
    return canonical(key, value)
