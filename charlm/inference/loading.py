"""A model rebuilt from a checkpoint, every field it needs checked before use.

The one loader behind `charlm generate`, `charlm eval perplexity`, `charlm train --resume` and the
tests (`load_model` finds and reads the file first)::

    ckpt["model_config"]   -> ModelConfig, checked            -> CharLM in the implementation asked for
    ckpt["vocab"]          -> Vocab, checked; its size must be model_config.vocab_size
    ckpt["preprocessing"]  -> one of d2l, lower, raw
    ckpt["model"]          -> names and shapes those the config implies (a model on the meta device:
                              nothing is allocated before they match), values finite
                              -> the model built, load_state_dict
    ckpt["ema"]["model"]   -> the same for the averaged weights of a run trained with --ema, which
                              generate and eval use unless asked for the raw ones

All implementations lay out their parameters like torch.nn.RNN/GRU/LSTM, so the same weights load
into any of them. Errors are one line, starting with `where` (the checkpoint's path).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlm.artifacts.checkpoint import find_checkpoint, load_checkpoint
from charlm.artifacts.fields import (check_parameters, check_train_config, check_vocab_size,
                                    expected_shapes)
from charlm.artifacts.folder import CONFIG, read_model_folder
from charlm.data.text import PREPROCESSING
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.config import ADJUSTABLE, WEIGHTS, ModelConfig, resolve_impl
from charlm.model.lm import CharLM
from charlm.system.devices import select_device


@dataclass
class Restored:
    model: CharLM  # in eval mode, on the device asked for
    vocab: Vocab
    preprocessing: str


def model_from_checkpoint(ckpt: dict, where: str = "checkpoint", impl: str | None = None,
                          device: torch.device | str = "cpu",
                          config: ModelConfig | None = None, weights: str = "raw") -> Restored:
    """The checkpoint's model, vocabulary and preprocessing, checked, weights loaded.

    `impl` (fused / scratch / fast / auto) runs the weights in another implementation; None keeps
    the checkpoint's own where it suits the device (a `fast` checkpoint runs `fused`, i.e.
    cuDNN, on a GPU: the C loops are CPU-only). `config` (a resumed run's) builds the model
    instead of the checkpoint's own model_config, which it must equal but for ADJUSTABLE.
    `weights`: raw (what training steps), ema (the run's averaged weights, --ema), or auto (ema
    where the checkpoint has them).
    """
    saved = ModelConfig.from_dict(ckpt.get("model_config"))
    try:
        vocab = Vocab.from_dict(ckpt.get("vocab"))
    except CharlmError as exc:
        raise CharlmError(f"{where}: {exc}; the file is damaged") from None
    check_vocab_size(where, len(vocab), saved.vocab_size)
    preprocessing = ckpt.get("preprocessing")
    if preprocessing not in PREPROCESSING:
        raise CharlmError(f"{where}: unknown preprocessing {preprocessing!r}; the file is damaged")
    if config is not None:
        for key, value in saved.to_dict().items():
            if key not in ADJUSTABLE and getattr(config, key) != value:
                raise CharlmError(
                    f"{where}: its model_config has {key} = {value!r} but its train_config "
                    f"gives {getattr(config, key)!r}; the file is damaged or was edited"
                )
    config = config or saved
    config.impl = impl_for(config.impl, impl, config.cell, torch.device(device).type,
                           config.gru_reset)
    config.validate()
    # The saved weights against the shapes the config implies, computed on the meta device,
    # before a byte of the model is allocated: a small file cannot make the real device build
    # a model of gigabytes (the averaged weights too, which a resumed run loads later).
    shapes = expected_shapes(config)
    check_parameters(where, shapes, ckpt.get("model"))
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("model"), dict):
        check_parameters(f"{where} (its averaged weights)", shapes, ema["model"])
    state = averaged_weights(ckpt, where, weights) or ckpt["model"]
    model = CharLM(config)
    model.load_state_dict(state)
    return Restored(model.to(device).eval(), vocab, preprocessing)


def impl_for(saved: str, asked: str | None, cell: str, device_type: str, gru_reset: str) -> str:
    """The implementation a checkpoint's weights run in: `asked` (auto resolved for the device),
    or with None the checkpoint's own, `saved`, except that `fast` runs as auto off the CPU."""
    if asked is None:
        asked = "auto" if saved == "fast" and device_type != "cpu" else saved
    return resolve_impl(asked, cell, device_type, gru_reset)


def averaged_weights(ckpt: dict, where: str, weights: str) -> dict | None:
    """The state dict of the run's averaged weights when `weights` asks for them (None: use the
    raw ones)."""
    if weights not in WEIGHTS:
        raise CharlmError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    ema = ckpt.get("ema")
    if weights == "raw" or (weights == "auto" and ema is None):
        return None
    if ema is None:
        raise CharlmError(f"{where} holds no averaged weights (it was trained without --ema); "
                          "drop --weights ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("model"), dict):
        raise CharlmError(f"{where}: its 'ema' entry is not a table of weights; the file is damaged")
    return ema["model"]


@dataclass
class Loaded:
    """A checkpoint ready for use: its file, its data, and its model (eval mode, on `device`)."""

    path: Path
    ckpt: dict[str, Any]
    model: CharLM
    vocab: Vocab
    preprocessing: str
    device: torch.device


def load_model(target: str | Path | None, impl: str | None, device_spec: str,
               weights: str = "auto", how_to_name: str = "pass --checkpoint PATH") -> Loaded:
    """The checkpoint at `target` (None: the latest run's best.pt) or the model folder `charlm
    export` wrote, its model rebuilt and checked (`charlm.inference.loading.model_from_checkpoint`);
    `impl` None keeps a checkpoint's own where it suits the device, and picks `auto`'s choice for
    a folder (which records none: its weights run in any implementation); `weights` auto takes
    the run's averaged weights where it has them."""
    path = find_checkpoint(target, how_to_name=how_to_name, exported=True)
    if path.is_dir():
        ckpt = read_model_folder(path)
        check_train_config(ckpt["train_config"], path / CONFIG)
        impl = impl or "auto"
    else:
        ckpt = load_checkpoint(path)  # on the CPU: the device may depend on the cell (MPS)
    cell = ckpt["model_config"].get("cell")
    device = select_device(device_spec, cell if isinstance(cell, str) else None)
    restored = model_from_checkpoint(ckpt, str(path), impl, device, weights=weights)
    return Loaded(path, ckpt, restored.model, restored.vocab, restored.preprocessing, device)


def weights_used(loaded: Loaded, asked: str) -> str:
    """Which weights `asked` (auto, ema, raw) runs for this checkpoint: "ema" or "raw"."""
    return "ema" if asked == "ema" or (asked == "auto" and loaded.ckpt.get("ema")) else "raw"


def model_info(loaded: Loaded, weights: str = "auto") -> dict:
    """Which model this is (what generate, eval and export say before they use it, and their
    --json "model"): its file, cell and size, corpus, how far it was trained and when saved
    (the file's time: a checkpoint records none)."""
    exported = loaded.ckpt.get("exported")
    training = (exported or {}).get("training") or loaded.ckpt
    step = training.get("step")
    file = loaded.path / "model.safetensors" if exported else loaded.path
    try:
        saved = datetime.datetime.fromtimestamp(file.stat().st_mtime).astimezone()
    except OSError:
        saved = None
    corpus = loaded.ckpt.get("corpus")
    mc = loaded.model.config
    return {"path": str(loaded.path), "exported": exported is not None, "cell": mc.cell,
            "layers": mc.layers, "hidden": mc.hidden,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "vocab_size": mc.vocab_size,
            "corpus": corpus.get("name") if isinstance(corpus, dict) else None,
            "step": step if isinstance(step, int) and not isinstance(step, bool) else None,
            "saved": saved.isoformat(timespec="seconds") if saved else None,
            "weights": weights_used(loaded, weights)}


def describe(info: dict) -> str:
    """`model_info` as one line: PATH: gru 2x256, N parameters, corpus C, trained to step S, saved
    DATE."""
    when = [f"step {info['step']:,}"] if info["step"] is not None else []
    if info["saved"]:
        when.append(("exported " if info["exported"] else "saved ")
                    + info["saved"][:16].replace("T", " "))
    return (f"{info['path']}: {info['cell']} {info['layers']}x{info['hidden']}, "
            f"{info['parameters']:,} parameters, corpus {info['corpus'] or 'unknown'}"
            + (f", trained to {', '.join(when)}" if when else "")
            + (", averaged weights (--ema)" if info["weights"] == "ema" else ""))
