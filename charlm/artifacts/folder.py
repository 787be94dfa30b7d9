"""The exported model folder: what `charlm export` writes and every command reads like a checkpoint.

    DIR/
      config.json        {"format": "charlm-model", "version": 1,
                          "model": ModelConfig less impl (any implementation runs the weights),
                          "preprocessing": "d2l" | ..., "vocab": {"tokens": [...], "counts": [...]},
                          "training": {step, tokens_seen, ..., "train_config", "corpus"},
                          "evaluation": {split, perplexity, bits_per_char, ...} | null,
                          "onnx": {file, inputs, outputs} (with --format onnx)}
      model.safetensors  the weights, named as in a checkpoint's state dict (torch.nn.GRU layout)
      model.onnx         --format onnx: one character step (token, state -> logits, state)
      README.md          the model card

No pickle anywhere: JSON and safetensors (a JSON header and raw little-endian arrays), so any
language can read the folder. `read_model_folder` turns it back into the plain dict a checkpoint
holds (the keys `charlm.inference.loading.model_from_checkpoint` reads), after checking that
config.json and the weights belong together: before a byte of weights is read, each tensor's
name, shape and dtype in the safetensors header is compared with the model config.json describes.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from charlm.artifacts.fields import expected_shapes
from charlm.data.text import PREPROCESSING
from charlm.data.vocab import Vocab
from charlm.errors import CharlmError, UsageError
from charlm.model.config import ModelConfig

FORMAT = "charlm-model"
VERSION = 1
CONFIG, WEIGHTS, ONNX, CARD = "config.json", "model.safetensors", "model.onnx", "README.md"
FILES = (CONFIG, WEIGHTS, ONNX, CARD)
# ModelConfig fields that say how to run the weights, not what they are
RUNTIME_FIELDS = ("impl",)
MAX_DEPTH = 32  # config.json nests 4 deep; a folder deeper than this was not written by charlm


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def folder_config(model_config: ModelConfig, vocab: dict, preprocessing: str,
                  training: dict | None = None, evaluation: dict | None = None,
                  onnx: dict | None = None) -> dict:
    """config.json's content (JSON types only; a non-finite number becomes null)."""
    model = {k: v for k, v in model_config.to_dict().items() if k not in RUNTIME_FIELDS}
    config = {"format": FORMAT, "version": VERSION, "model": model,
              "preprocessing": preprocessing, "vocab": vocab, "training": training or {},
              "evaluation": evaluation}
    if onnx:
        config["onnx"] = onnx
    return _finite(config)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def config_bytes(config: dict) -> bytes:
    return (json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """model.safetensors: each tensor copied to the CPU (tied or shared tensors become separate
    copies, which safetensors requires), in the float32 the model computes in."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in state_dict.items()}
    return save(tensors, metadata={"format": "pt"})


# --- reading -----------------------------------------------------------------------------------


def read_model_folder(folder: Path) -> dict:
    """The folder as a checkpoint's plain dict: model_config (its impl a placeholder, the
    caller picks one), vocab, preprocessing, model (the weights), train_config, corpus, and the
    folder's own `exported` config. One-line CharlmErrors name the file and what is wrong."""
    config = read_config(folder / CONFIG)
    model_config = _model_config(config, folder / CONFIG)
    weights = _read_weights(folder / WEIGHTS, model_config)
    training = config.get("training") or {}
    return {"model_config": model_config.to_dict(), "vocab": config["vocab"],
            "preprocessing": config["preprocessing"], "model": weights,
            "train_config": training.get("train_config"), "corpus": training.get("corpus"),
            "exported": config}


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CharlmError(f"{path} does not exist; export the model again") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CharlmError(f"{path} is not valid JSON ({exc}); the folder is damaged") from None
    except RecursionError:  # the decoder recurses once per nested array or object
        raise CharlmError(f"{path} nests arrays or objects too deeply; the folder is damaged") \
            from None
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror}") from None
    if _depth(config) > MAX_DEPTH:  # every later walk of it (checks, printing) stays shallow
        raise CharlmError(f"{path} nests arrays or objects more than {MAX_DEPTH} deep; the "
                          "folder is damaged")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm model config (no \"format\": \"{FORMAT}\")")
    version = config.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CharlmError(f"{path} has no valid format version; the folder is damaged")
    if version > VERSION:
        raise CharlmError(f"{path} is model folder format version {version}, newer than this "
                          f"charlm reads ({VERSION}); upgrade charlm")
    for key, kind in (("model", dict), ("vocab", dict), ("preprocessing", str)):
        if not isinstance(config.get(key), kind):
            raise CharlmError(f"{path} lacks a valid '{key}' entry; the folder is damaged")
    if config["preprocessing"] not in PREPROCESSING:
        raise CharlmError(f"{path}: unknown preprocessing {config['preprocessing']!r}; "
                          f"this charlm knows {', '.join(PREPROCESSING)}")
    for key in ("training", "evaluation", "onnx"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CharlmError(f"{path}: its '{key}' entry is not a table; the folder is damaged")
    training = config.get("training") or {}
    for key in ("train_config", "corpus"):
        if training.get(key) is not None and not isinstance(training[key], dict):
            raise CharlmError(f"{path}: its training '{key}' is not a table; the folder is damaged")
    return config


def _depth(value: Any) -> int:
    """How deeply `value`'s lists and dicts nest (0 for a number or string), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _model_config(config: dict, path: Path) -> ModelConfig:
    """config.json's model, checked by ModelConfig's own rules, and its vocabulary's size."""
    model = config["model"]
    known = {f.name for f in fields(ModelConfig)} - set(RUNTIME_FIELDS)
    unknown = sorted(set(model) - known)
    if unknown:
        raise CharlmError(f"{path}: its model has unknown keys {unknown}; it was written by a "
                          "newer charlm: upgrade charlm to load it")
    try:
        # a placeholder impl (the caller picks one): torch's own, or scratch, the one that has
        # the reset gate before W_hh
        impl = "scratch" if model.get("gru_reset") == "before" else "fused"
        model_config = ModelConfig(**{**model, "impl": impl}).validate()
    except TypeError as exc:
        raise CharlmError(f"{path}: its model is incomplete ({exc}); the folder is damaged") from None
    except UsageError as exc:
        raise CharlmError(f"{path}: its model is invalid: {exc}") from None
    try:
        tokens = len(Vocab.from_dict(config["vocab"]))
    except CharlmError as exc:
        raise CharlmError(f"{path}: {exc}; the folder is damaged") from None
    if tokens != model_config.vocab_size:
        raise CharlmError(f"{path}: its vocabulary has {tokens} tokens but its model says "
                          f"vocab_size {model_config.vocab_size}; the folder is damaged or was "
                          "edited")
    return model_config


def _read_weights(path: Path, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    config = path.with_name(CONFIG)
    if not path.is_file():
        raise CharlmError(f"{path} does not exist; the folder is incomplete: export it again")
    expected = expected_shapes(model_config)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            found = {name: fh.get_slice(name) for name in fh.keys()}
            for name in expected:
                if name not in found:
                    raise CharlmError(f"{path} lacks tensor {name}, which the model of {config} "
                                      "needs; the files do not belong together")
            for name, tensor in found.items():
                if name not in expected:
                    raise CharlmError(f"{path} holds tensor {name}, which the model of {config} "
                                      "does not have; the files do not belong together")
                shape = tuple(tensor.get_shape())
                if shape != expected[name]:
                    raise CharlmError(f"{path}: tensor {name} has shape {shape} but the model of "
                                      f"{config} needs {expected[name]}; the files do not belong "
                                      "together")
                if tensor.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                    raise CharlmError(f"{path}: tensor {name} is {tensor.get_dtype()}, not "
                                      "floating point; the folder is damaged")
            weights = {name: fh.get_tensor(name) for name in expected}
    except SafetensorError as exc:
        raise CharlmError(f"{path} is not a readable safetensors file ({exc}); the folder is "
                          "damaged: export it again") from None
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    for name, tensor in weights.items():
        if not bool(torch.isfinite(tensor).all()):
            raise CharlmError(f"{path}: tensor {name} holds NaN or infinity; export the model "
                              "again from a good checkpoint")
    return {name: tensor.float() for name, tensor in weights.items()}
