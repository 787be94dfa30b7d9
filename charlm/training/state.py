"""A run's state in a checkpoint: what `charlm train` saves, and how `--resume` puts it back.

The payload holds plain data only (tensors, numbers, strings, lists, dicts), so checkpoints load
with ``torch.load(weights_only=True)``. Restoring checks the saved weights against the model the
run's config builds (one-line errors naming the weight) before anything is loaded.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from charlm.training import distributed
from charlm.training import rundir
from charlm.training.checkpoint import load_checkpoint
from charlm.training.config import TrainConfig
from charlm.errors import CharlmError, UsageError
from charlm.model.lm import State, check_parameters, check_vocab_size

if TYPE_CHECKING:
    from charlm.training.trainer import Trainer

# Options that define the model or its data: a resumed run must not change them.
FIXED_ON_RESUME = (
    "cell", "hidden", "layers", "embed", "nonlinearity", "gru_reset", "corpus", "text", "url",
    "preprocessing", "min_freq", "max_vocab", "max_tokens", "val_fraction", "test_fraction",
    "batch_size", "num_steps", "sampling", "optimizer", "seed",
)


def resolve_resume(cfg: TrainConfig, explicit: dict, resume: str) -> tuple[TrainConfig, dict]:
    """The checkpoint's config, with the options given on the command line laid over it."""
    from charlm.training.checkpoint import find_checkpoint

    target = None if resume == "latest" else resume
    path = find_checkpoint(target, rundir.runs_root(), prefer="last.pt",
                           how_to_name="name one: charlm train --resume RUN_DIR|CHECKPOINT")
    ckpt = load_checkpoint(path)
    saved = dict(ckpt.get("train_config") or {})
    for key in FIXED_ON_RESUME:
        if key in explicit and explicit[key] is not None and explicit[key] != saved.get(key):
            raise UsageError(
                f"--{key.replace('_', '-')} {explicit[key]} disagrees with the checkpoint "
                f"({saved.get(key)}) being resumed; drop the option or start a new run"
            )
    values = TrainConfig().to_dict()
    values.update({k: v for k, v in saved.items() if k in values})
    values.update({k: v for k, v in explicit.items() if v is not None and k not in FIXED_ON_RESUME})
    values["out"] = str(path.parent)
    from charlm.training.config import build_config

    return build_config(values, {}), {"path": path, "ckpt": ckpt}


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


def state_to_plain(state: State | None):
    if state is None:
        return None
    return [s.detach().cpu() for s in state] if isinstance(state, tuple) else state.detach().cpu()


def state_from_plain(data, device) -> State | None:
    if data is None:
        return None
    return tuple(s.to(device) for s in data) if isinstance(data, list) else data.to(device)


def payload(t: Trainer) -> dict:
    """Everything a checkpoint holds: plain tensors, numbers, strings, lists and dicts."""
    loop = t.loop
    hidden = state_to_plain(t.hidden) if t.cfg.sampling == "sequential" else None
    # in a process group: every rank's hidden rows and RNG state, joined on rank 0
    rng = rng_state()
    hidden, ranks = distributed.gather_state(t.group, hidden, rng)
    return {
        "model_config": t.model_config.to_dict(),
        "vocab": t.data.vocab.to_dict(),
        "preprocessing": t.data.preprocessing,
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.schedule.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler else None,
        "rng": rng,
        "iterator": t.batches.state_dict(),
        "hidden": hidden,
        "step": loop.step, "epoch": t.batches.epoch, "tokens_seen": loop.tokens_seen,
        "elapsed": loop.elapsed, "best_val_loss": loop.best_val_loss,
        "train_config": t.cfg.to_dict(),
        "corpus": t.data.describe(),
        **ranks,
    }


def restore(t: Trainer, ckpt: dict, where: str) -> None:
    """Put a trainer back where the checkpoint left it (its model was built from the same config)."""
    saved_config = ckpt.get("model_config")
    said = saved_config.get("vocab_size") if isinstance(saved_config, dict) else None
    check_vocab_size(where, len(t.data.vocab), said)
    check_parameters(where, t.model, ckpt.get("model"))  # one line naming the weight
    try:
        t.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CharlmError(f"checkpoint does not match its own model config: {first}") from None
    t.schedule.load_state_dict(ckpt["scheduler"])
    if t.scaler and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    t.batches.load_state_dict(ckpt["iterator"])
    hidden, rng = distributed.rank_state(t.group, ckpt, t.cfg.batch_size)
    t.hidden = state_from_plain(hidden, t.device)
    t.loop.step, t.loop.tokens_seen = int(ckpt["step"]), int(ckpt["tokens_seen"])
    t.loop.elapsed, t.loop.best_val_loss = float(ckpt["elapsed"]), float(ckpt["best_val_loss"])
    set_rng_state(rng)
