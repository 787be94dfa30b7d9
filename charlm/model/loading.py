"""A model rebuilt from a checkpoint, every field it needs checked before use.

The one loader behind `charlm generate`, `charlm eval perplexity`, `charlm train --resume` and the
tests (`charlm.training.checkpoint.load_model` finds and reads the file first)::

    ckpt["model_config"]   -> ModelConfig, checked            -> CharLM in the implementation asked for
    ckpt["vocab"]          -> Vocab, checked; its size must be model_config.vocab_size
    ckpt["preprocessing"]  -> one of d2l, lower, raw
    ckpt["model"]          -> names and shapes those of the model, values finite -> load_state_dict
    ckpt["ema"]["model"]   -> the same for the averaged weights of a run trained with --ema, which
                              generate and eval use unless asked for the raw ones

All implementations lay out their parameters like torch.nn.RNN/GRU/LSTM, so the same weights load
into any of them. Errors are one line, starting with `where` (the checkpoint's path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from charlm.data.text import PREPROCESSING
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError
from charlm.model.config import WEIGHTS, ModelConfig, resolve_impl
from charlm.model.lm import CharLM


@dataclass
class Restored:
    model: CharLM  # in eval mode, on the device asked for
    vocab: Vocab
    preprocessing: str


# What a resumed run may change about its model: none changes a weight's shape.
ADJUSTABLE = ("impl", "dropout", "input_dropout", "embed_dropout", "weight_drop", "locked_dropout")
# Trained weights and states stay within about 100; past this bound float32 products overflow
# (a checkpoint near float32's limit would only ever compute infinities and NaN).
MAX_MAGNITUDE = 1e6


def tensor_problem(t: torch.Tensor) -> str | None:
    """None when `t` is a plain strided tensor whose storage holds every element its shape
    declares; else what is wrong, in a few words. Pure arithmetic on the sizes: it reads no
    element, so a tensor that declares billions of elements over a tiny storage costs nothing."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta:
        return f"is not a plain dense tensor ({str(t.layout).removeprefix('torch.')})"
    shape, strides = tuple(t.shape), t.stride()
    numel = math.prod(shape)
    if numel == 0:
        return None
    if any(stride < 0 for stride in strides):
        return f"has negative strides {strides}"
    item = t.element_size()
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return "has no storage"
    extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(shape, strides)) + 1
    if numel * item > held or extent * item > held:
        return (f"declares shape {shape} ({numel:,} elements) but holds data for "
                f"{held // item:,}")
    return None


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
    model = CharLM(config)
    state = averaged_weights(ckpt, where, weights) or ckpt.get("model")
    check_parameters(where, model, state)
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


def check_vocab_size(where: str, tokens: int, said: object) -> None:
    """Refuse a checkpoint whose vocabulary and model config disagree on the vocabulary size."""
    if tokens != said:
        raise CharlmError(f"{where}: its vocabulary has {tokens} tokens but its model config says "
                          f"{said}; the file is damaged")


def check_parameters(where: str, model: nn.Module, saved: object) -> None:
    """Refuse, naming the parameter, saved weights whose names, shapes or values do not fit
    ``model`` (one-line CharlmErrors that start with ``where``, e.g. the checkpoint's path)."""
    if not isinstance(saved, dict):
        raise CharlmError(f"{where}: its 'model' entry is not a table of tensors; the file is damaged")
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(map(str, unexpected[:3]))}"] if unexpected else [])
        raise CharlmError(
            f"{where}: its parameters do not match its model config ({'; '.join(parts)}); "
            "the file is damaged"
        )
    for name, want in expected.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CharlmError(
                f"{where}: parameter {name} is {shape} but its model config gives "
                f"{tuple(want.shape)}; the file is damaged"
            )
        problem = tensor_problem(got) or (
            None if got.is_floating_point()
            else f"has dtype {str(got.dtype).removeprefix('torch.')}, not a float")
        if problem:
            raise CharlmError(f"{where}: parameter {name} {problem}; the file is damaged")
    for name in expected:  # values only once every tensor is known to be what it says
        got = saved[name]
        if not torch.isfinite(got).all():
            raise CharlmError(f"{where}: parameter {name} holds NaN or infinity; use another checkpoint")
        if got.numel() and float(got.abs().max()) > MAX_MAGNITUDE:
            raise CharlmError(f"{where}: parameter {name} holds values beyond "
                              f"{MAX_MAGNITUDE:g}; the file is damaged")
