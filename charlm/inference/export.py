"""`charlm export`: a trained model as a folder anyone can use (see `charlm.artifacts.folder`).

    checkpoint --load_model (checked as generate checks it)--> weights, vocabulary, configs
      --> .DIR.<pid>.<hex>.tmp/  model.safetensors, config.json [, model.onnx checked with
                                 onnxruntime], loaded back as a user will load it
      --> exact validation figures (`charlm eval perplexity`'s) and a sample  --> README.md
      --> renamed to DIR in one step: DIR is never half-written

The figures and the sample come from the model as the folder gives it (implementation `auto` on
the device), so `charlm eval perplexity --checkpoint DIR` and the card's generate command repeat
them exactly.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from charlm.about import __version__
from charlm.artifacts import folder as model_folder
from charlm.artifacts.card import CardFacts, model_card
from charlm.data.text import preprocess, readable
from charlm.errors import CharlmError, UsageError, warn
from charlm.inference.evaluate import perplexity_of
from charlm.inference.loading import (Loaded, describe, load_model, model_from_checkpoint,
                                      model_info)
from charlm.inference.sample import SampleSettings, generate
from charlm.inference.splits import run_data
from charlm.model.lm import count_parameters
from charlm.system.devices import select_device, set_tf32
from charlm.system.files import atomic_write, temp_path

FORMATS = ("safetensors", "onnx")
ONNX_CHECK_STEPS = 64  # characters run through onnxruntime and torch before the folder is kept
ONNX_TOLERANCE = 1e-4  # a larger logit difference means the graph is wrong, not rounding
TRAINING_KEYS = ("step", "epoch", "tokens_seen", "elapsed", "best_val_loss")


@dataclass
class Exported:
    folder: Path
    files: dict[str, int]  # name -> bytes
    source: str
    evaluation: dict | None
    sample: str
    onnx_difference: float | None = None
    notes: list[str] = field(default_factory=list)
    model: dict | None = None  # which model was exported (`model_info`)

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "files": self.files, "source": self.source,
                "evaluation": self.evaluation, "sample": self.sample,
                "onnx_max_abs_difference": self.onnx_difference, "model": self.model}


def export_model(target: str | Loaded | None, out: Path, fmt: str = "safetensors", device: str = "auto",
                 force: bool = False, prefix: str | None = None, sample_length: int = 300,
                 seed: int = 0, say: Callable[[str], None] = lambda line: None,
                 weights: str = "auto") -> Exported:
    """Write the folder `out` for the checkpoint at `target` (None: the latest run's best.pt;
    or a model loaded on the CPU in implementation auto); `weights` (auto, ema, raw) as
    generate and eval take them."""
    out = Path(out)
    replacing = check_export(out, fmt, force, sample_length)
    where = out.resolve()  # `--out .` or `x/..` have no name of their own
    # the model as the folder will give it on a CPU
    cpu = target if isinstance(target, Loaded) else load_model(
        target, "auto", "cpu", weights, how_to_name="name one: charlm export RUN_DIR --out DIR")
    say(f"exporting {describe(model_info(cpu, weights))}")
    staging = temp_path(where)
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise CharlmError(f"cannot create {out}: {exc.strerror or exc}; choose another --out") from None
    try:
        result = _write(cpu, staging, where.name, fmt, device, prefix, sample_length, seed, say,
                        weights)
        _swap(staging, where, replacing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.folder, result.model = out, model_info(cpu, weights)
    return result


def check_export(out: Path, fmt: str, force: bool, sample_length: int) -> bool:
    """The options checked before any checkpoint is read; whether `out` holds an earlier export
    that --force replaces."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if sample_length < 1:
        raise UsageError(f"--sample-length must be >= 1, got {sample_length}")
    if fmt == "onnx":
        from charlm.artifacts.onnxstep import require_extra

        require_extra()
    return _check_out(Path(out), force)


def _check_out(out: Path, force: bool) -> bool:
    """Whether `out` holds an earlier export that --force replaces; refuse anything else there."""
    if out.exists() and not out.is_dir():
        raise CharlmError(f"--out {out} exists and is not a folder; choose another --out")
    if not out.is_dir():
        return False
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise CharlmError(f"--out {out} is the current folder or holds it; export into a new or "
                          "empty folder")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return False
    others = [n for n in names if n not in model_folder.FILES]
    if others or not model_folder.is_model_folder(out):
        shown = ", ".join(others[:3] or names[:3]) + (", ..." if len(others or names) > 3 else "")
        raise CharlmError(f"--out {out} already holds other files ({shown}); export into a new "
                          "or empty folder")
    if not force:
        raise CharlmError(f"--out {out} already holds an exported model; pass --force to replace "
                          "it, or choose another --out")
    return True


def _swap(staging: Path, out: Path, replacing: bool) -> None:
    """Put the finished folder in place with renames; an earlier export goes only once the new
    one is complete."""
    old = temp_path(out)
    try:
        if replacing:
            os.rename(out, old)
        os.replace(staging, out)  # onto a missing or empty folder
    except OSError as exc:
        if replacing and old.exists() and not out.exists():
            os.rename(old, out)
        raise CharlmError(f"cannot create {out}: {exc.strerror or exc}; nothing was changed") from None
    shutil.rmtree(old, ignore_errors=True)


def _write(cpu: Loaded, staging: Path, name: str, fmt: str, device: str, prefix: str | None,
           sample_length: int, seed: int, say: Callable[[str], None], weights: str) -> Exported:
    model, ckpt = cpu.model, cpu.ckpt
    training = {k: ckpt[k] for k in TRAINING_KEYS if k in ckpt}
    exported = ckpt.get("exported") or {}  # a folder exported again keeps its history
    training = {**(exported.get("training") or {}), **training, "charlm_version": __version__,
                "train_config": ckpt.get("train_config"), "corpus": ckpt.get("corpus")}
    files: dict[str, bytes] = {model_folder.WEIGHTS: model_folder.weights_bytes(model.state_dict())}
    onnx_info, difference = None, None
    if fmt == "onnx":
        from charlm.artifacts.onnxstep import io_names, onnx_bytes, onnx_difference

        say("writing model.onnx (the one-character step)")
        files[model_folder.ONNX] = onnx_bytes(model)
        tokens = _check_tokens(ckpt, cpu, ONNX_CHECK_STEPS)
        difference = onnx_difference(files[model_folder.ONNX], model, tokens, batch=2)
        if not difference <= ONNX_TOLERANCE:
            raise CharlmError(
                f"model.onnx gives logits {difference:.2g} away from charlm's over {len(tokens)} "
                "characters (more than rounding); the folder was not written: please report this")
        say(f"checked model.onnx with onnxruntime: {len(tokens)} characters, largest logit "
            f"difference {difference:.1e}")
        inputs, outputs = io_names(model.config.cell)
        onnx_info = {"file": model_folder.ONNX, "inputs": inputs, "outputs": outputs,
                     "opset": _opset()}
    config = model_folder.folder_config(model.config, ckpt["vocab"], cpu.preprocessing,
                                        training, None, onnx_info)
    files[model_folder.CONFIG] = model_folder.config_bytes(config)
    for file, data in files.items():
        atomic_write(staging / file, lambda fh, data=data: fh.write(data))
    _check_round_trip(staging, cpu)

    evaluation, notes, run_prefix = _evaluate(cpu, device, say, weights)
    text_prefix = (run_prefix if prefix is None and run_prefix is not None
                   else _sample_prefix(ckpt, cpu.preprocessing, prefix))
    settings = SampleSettings(length=sample_length, seed=seed)
    ids = cpu.vocab.encode(text_prefix).tolist()
    sample = readable(text_prefix + cpu.vocab.decode(generate(model, ids, settings)[0]),
                      cpu.preprocessing)  # a byte-level model's bytes as text
    config["evaluation"] = evaluation
    files[model_folder.CONFIG] = model_folder.config_bytes(config)
    facts = CardFacts(config=config, parameters=count_parameters(model), evaluation=evaluation,
                      sample=sample, prefix=readable(text_prefix, cpu.preprocessing),
                      sample_length=sample_length, seed=seed,
                      notes=notes, onnx=onnx_info is not None, name=name,
                      weights_bytes=len(files[model_folder.WEIGHTS]))
    files[model_folder.CARD] = model_card(facts).encode("utf-8")
    for file in (model_folder.CONFIG, model_folder.CARD):
        atomic_write(staging / file, lambda fh, data=files[file]: fh.write(data))
    return Exported(staging, {n: len(d) for n, d in sorted(files.items())}, str(cpu.path),
                    evaluation, sample, difference, notes)


def _opset() -> int:
    from charlm.artifacts.onnxstep import OPSET

    return OPSET


def _check_round_trip(staging: Path, cpu: Loaded) -> None:
    """The written folder reads back, through the checks every command applies, to the same
    weights."""
    back = model_from_checkpoint(model_folder.read_model_folder(staging), str(staging),
                                 cpu.model.config.impl, "cpu").model.state_dict()
    for name, tensor in cpu.model.state_dict().items():
        if not torch.equal(back[name], tensor.float().cpu()):
            raise CharlmError(f"the exported tensor {name} did not read back equal; the folder "
                              "was not written: please report this")


def _check_tokens(ckpt: dict, cpu: Loaded, steps: int) -> list[int]:
    """Characters to check model.onnx on: the sample prefix, then the vocabulary in turn."""
    text = _sample_prefix(ckpt, cpu.preprocessing, None)
    ids = cpu.vocab.encode(text).tolist() if text else []
    ids += [i % len(cpu.vocab) for i in range(steps)]
    return ids[:steps]


def _evaluate(cpu: Loaded, device: str, say: Callable[[str], None], weights: str
              ) -> tuple[dict | None, list[str], str | None]:
    """`charlm eval perplexity`'s figures on the run's validation split, or why there are none;
    and the run's own sample prompt, which its corpus (read for the split) gives."""
    same = select_device(device) == cpu.device
    loaded = cpu if same else load_model(cpu.path, "auto", device, weights)
    try:
        data = run_data(loaded, "val")
    except CharlmError as exc:
        note = f"no validation figures: {exc}"
        warn(note)
        return None, [note], None
    run_prefix = data.sample_prefix((cpu.ckpt.get("train_config") or {}).get("sample_prefix"))
    if data.val.numel() < 2:
        note = "no validation figures: the validation split is shorter than 2 characters"
        warn(note)
        return None, [note], run_prefix
    say(f"evaluating on the validation split ({data.val.numel() - 1:,} characters)")
    set_tf32(False)  # exact float32, as `charlm eval perplexity` computes it
    result = perplexity_of(loaded.model, data.val,
                           byte_vocab=loaded.vocab if loaded.preprocessing == "bytes" else None)
    return {"split": "val", **result.to_dict()}, [], run_prefix


def _sample_prefix(ckpt: dict, preprocessing: str, given: str | None) -> str:
    """--prefix, else the run's --sample-prefix, else its corpus's default prompt."""
    if given is None:
        given = (ckpt.get("train_config") or {}).get("sample_prefix")
    if given is None:
        from charlm.data.corpus import registry

        name = (ckpt.get("corpus") or {}).get("name")
        entry = registry().get(name) if isinstance(name, str) else None
        given = entry.sample_prefix if entry else ""
    return preprocess(given, preprocessing).lstrip() if given else ""
