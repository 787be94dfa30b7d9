"""What each field of a checkpoint may hold, checked before anything computes with it.

A checkpoint is untrusted input: a file someone sent, edited or crafted. torch.load(weights_only=
True) guarantees plain data only; what plain data may still do is checked here, in this order:

    1. tensors    every tensor anywhere in the file is a plain strided tensor whose storage
                  holds every element its shape declares (a 57 KB file can otherwise declare a
                  200000 x 20000 tensor of stride 0, and the first check that computes over it
                  allocates gigabytes); nothing below touches a value before this holds
    2. structure  each field's type, keys, names, shapes and dtypes (`check_fields`; the model's
                  weights against its config in `charlm.inference.loading`)
    3. values     finite, and within MAX_MAGNITUDE (beyond, float32 arithmetic overflows)
    4. resuming   the training state a resumed run restores is all there, of the right types
                  and consistent with its train_config (`check_resumable`); the optimizer's
                  per-parameter state is checked against the parameters where it is loaded
                  (`charlm.training.optim.load_optimizer_state`)

Every refusal is one CharlmError line that names the file and the field and says the file is
damaged; they all happen while the run is built, before any file of the run is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from charlm.config.train import TYPES
from charlm.config.build import type_ok
from charlm.errors import CharlmError

# Trained weights and states stay within about 100; past this bound float32 products overflow
# (a checkpoint near float32's limit would only ever compute infinities and NaN).
MAX_MAGNITUDE = 1e6


MAX_COUNT = 2**63 - 1  # counters, seeds, positions: they meet torch as int64
RESUME_KEYS = ("optimizer", "scheduler", "iterator", "rng", "train_config", "step",
               "tokens_seen", "elapsed", "best_val_loss")
SCHEDULER_KEYS = ("scale", "best", "bad_evals")
ITERATOR_KEYS = ("epoch", "position", "seed", "batch_size", "num_steps", "num_tokens")
EVALUATIONS = ("periodic", "whole")  # which evaluation `eval_pending` says a stop cut short


def damaged(path: Path | str, key: str, problem: str) -> CharlmError:
    return CharlmError(f"{path}: its '{key}' entry {problem}; the file is damaged or was edited")


def _is_int(value: Any, low: int = 0, high: int = MAX_COUNT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_tensors(data: Any, path: Path | str) -> None:
    """Step 1: every tensor in `data` (walked without recursion) has the elements it declares."""
    nested = (dict, list, tuple, torch.Tensor)  # what may hold a tensor or be one
    todo = [((), data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            todo += [((*where, str(k)), v) for k, v in value.items() if isinstance(v, nested)]
        elif isinstance(value, (list, tuple)):  # (a vocabulary's strings are skipped at once)
            todo += [((*where, str(i)), v) for i, v in enumerate(value) if isinstance(v, nested)]
        elif isinstance(value, torch.Tensor):
            problem = tensor_problem(value)
            if problem:
                key = where[0] if where else "?"
                name = ".".join(where[1:])
                raise damaged(path, key, f"holds a tensor{' ' + name if name else ''} that "
                              f"{problem}")


def _check_magnitude(path, key: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if not bool(torch.isfinite(tensor).all()):
        if key == "model":
            raise CharlmError(
                f"{path}: its weight {name} holds NaN or infinity; the file is damaged: use "
                "another checkpoint (best.pt or last.pt of the run)")
        raise damaged(path, key, "holds NaN or infinity")
    largest = float(tensor.detach().abs().max())
    if largest > MAX_MAGNITUDE:
        what = f"weight {name}" if key in ("model", "ema") else "tensor"
        raise damaged(path, key, f"holds a {what} of magnitude {largest:.3g}, beyond any trained "
                      f"model's (at most {MAX_MAGNITUDE:g})")


def check_fields(data: dict, path: Path | str) -> None:
    """Steps 1-3 for the fields the commands use (load_checkpoint calls it on every file)."""
    check_tensors(data, path)
    model = data["model"]
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise CharlmError(f"{path}: its 'model' entry is not a table of tensors; the file is damaged")
    for name, tensor in model.items():
        if not tensor.is_floating_point():
            raise damaged(path, "model", f"holds weight {name} of dtype "
                          f"{str(tensor.dtype).removeprefix('torch.')}, not a float")
    for name, tensor in model.items():
        _check_magnitude(path, "model", name, tensor)
    _check_ema(data.get("ema"), path)
    if not isinstance(data["model_config"], dict):
        raise damaged(path, "model_config", "is not a table")
    for key in ("step", "epoch", "tokens_seen"):
        if key in data and not _is_int(data[key]):
            raise damaged(path, key, f"is {data[key]!r}, not a whole number in [0, 2**63)")
    if "elapsed" in data and not (_is_number(data["elapsed"]) and 0 <= data["elapsed"] < math.inf):
        raise damaged(path, "elapsed", f"is {data['elapsed']!r}, not a number of seconds")
    best = data.get("best_val_loss", 0.0)
    if not _is_number(best) or math.isnan(best):
        raise damaged(path, "best_val_loss", f"is {best!r}, not a number")
    for key in ("optimizer", "scheduler", "iterator", "rng", "train_config", "corpus"):
        if key in data and not isinstance(data[key], dict):
            raise damaged(path, key, "is not a table")
    optimizer = data.get("optimizer")
    if optimizer is not None and not (
        isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)
    ):
        raise damaged(path, "optimizer", "lacks its 'state' and 'param_groups'")
    scheduler = data.get("scheduler") or {}
    if not all(_is_number(v) for v in scheduler.values()):
        raise damaged(path, "scheduler", "holds something other than numbers")
    world = data.get("world_size", 1)
    if not _is_int(world, low=1, high=1 << 20):
        raise damaged(path, "world_size", f"is {world!r}, not a number of processes")
    if "rng" in data:
        _check_rng(data["rng"], path, "rng")
    check_train_config(data.get("train_config"), path)
    _check_hidden(data, path)
    _check_corpus(data.get("corpus"), path)


def _check_ema(ema: Any, path) -> None:
    """None, or {"decay", "updates", "model": the averaged weights, floats like the model's}
    (their names and shapes are checked against the model where they are loaded)."""
    if ema is None:
        return
    weights = ema.get("model") if isinstance(ema, dict) else None
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point()
            for k, v in weights.items()):
        raise damaged(path, "ema", "is not a table of averaged float weights")
    if not (_is_int(ema.get("updates")) and _is_number(ema.get("decay"))
            and 0 <= ema["decay"] < 1):
        raise damaged(path, "ema", "lacks its decay in [0, 1) and whole update count")
    for name, tensor in weights.items():
        _check_magnitude(path, "ema", name, tensor)


def _check_rng(rng: Any, path, key: str) -> None:
    """{"torch": the CPU generator's state, "python": [...], and the training device's:
    "device" ("cuda" or "mps") with "device_rng" (older files: "cuda", [one per GPU])}."""
    state = rng.get("torch") if isinstance(rng, dict) else None
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
            and state.numel() == torch.get_rng_state().numel()):
        raise damaged(path, key, "does not hold a torch generator state")
    python = rng.get("python")  # the Mersenne Twister's 624 words and its position (<= 624)
    if python is not None and not (isinstance(python, list) and len(python) == 625 and all(
            _is_int(v, high=2**32 - 1) for v in python) and python[-1] <= 624):
        raise damaged(path, key, "does not hold Python's generator state")
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.dim() == 1 for s in cuda):
        raise damaged(path, key, "does not hold CUDA generator states")
    device, device_rng = rng.get("device"), rng.get("device_rng")
    if device is not None and not (device in ("cuda", "mps") and isinstance(device_rng, torch.Tensor)
                                   and device_rng.dtype == torch.uint8 and device_rng.dim() == 1):
        raise damaged(path, key, "does not hold its device's generator state")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        if any(s.numel() != torch.cuda.get_rng_state().numel() for s in cuda):
            raise damaged(path, key, "does not hold CUDA generator states")


def _check_hidden(data: dict, path) -> None:
    """The carried state: None, or (layers, batch, hidden) float tensors (h, or [h, c] for an
    LSTM) whose layers, batch and units are those of the train_config a resumed run rebuilds."""
    hidden = data.get("hidden")
    if hidden is None:
        return
    parts = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
    tc = data.get("train_config") or {}
    layers, size, batch = tc.get("layers"), tc.get("hidden"), tc.get("batch_size")
    cell = tc.get("cell")
    if cell in ("rnn", "gru", "lstm", "mingru", "minlstm") and len(parts) != (2 if cell == "lstm" else 1):
        raise damaged(path, "hidden", f"holds {len(parts)} state tensor(s), but a {cell} "
                      f"carries {2 if cell == 'lstm' else 1}")
    for part in parts:
        if not isinstance(part, torch.Tensor) or part.dim() != 3:
            raise damaged(path, "hidden", "is not a (layers, batch, hidden) state")
        if not part.is_floating_point():
            raise damaged(path, "hidden", f"has dtype {str(part.dtype).removeprefix('torch.')}, "
                          "not a float")
        if _is_int(layers, 1) and _is_int(size, 1) and (part.shape[0], part.shape[2]) != (layers, size):
            raise damaged(
                path, "hidden", f"has shape {tuple(part.shape)} but its train_config has "
                f"layers = {layers} and hidden = {size}"
            )
        if _is_int(batch, 1) and part.shape[1] != batch:
            raise damaged(path, "hidden", f"has shape {tuple(part.shape)} but its train_config "
                          f"has batch_size = {batch}")
        _check_magnitude(path, "hidden", "", part)


def check_train_config(values: dict | None, path) -> None:
    if values is None:
        return
    for key, value in values.items():
        if key in TYPES and not type_ok(key, value):
            raise damaged(path, "train_config", f"has {key} = {value!r}, of the wrong type")


def _check_corpus(corpus: Any, path) -> None:
    """{"name", "source", "num_tokens", "splits", "sha256"}: read by resume and eval."""
    if corpus is None:
        return
    for key, ok in (("name", lambda v: isinstance(v, str)), ("source", lambda v: isinstance(v, str)),
                    ("num_tokens", _is_int), ("splits", lambda v: isinstance(v, dict)),
                    ("sha256", lambda v: isinstance(v, str) and len(v) == 64)):
        if key in corpus and not ok(corpus[key]):
            raise damaged(path, "corpus", f"has {key} = {corpus[key]!r}, of the wrong type")


def check_resumable(data: dict, path) -> None:
    """Step 4: what `Trainer.load_state_dict` restores is there and of the right form."""
    for key in RESUME_KEYS:
        if key not in data:
            raise damaged(path, key, "is missing, so the run cannot be resumed")
    scheduler = data["scheduler"]
    if not all(k in scheduler for k in SCHEDULER_KEYS):
        raise damaged(path, "scheduler", f"lacks one of {', '.join(SCHEDULER_KEYS)}")
    if not (scheduler["scale"] > 0 and math.isfinite(scheduler["scale"])
            and not math.isnan(scheduler["best"]) and _is_int(scheduler["bad_evals"])):
        raise damaged(path, "scheduler", f"holds {scheduler!r}, not a schedule's state")
    iterator = data["iterator"]
    if not all(_is_int(iterator.get(k)) for k in ITERATOR_KEYS):
        raise damaged(path, "iterator", f"does not hold whole numbers >= 0 for "
                      f"{', '.join(ITERATOR_KEYS)}")
    world = data.get("world_size", 1)
    if world > 1:
        ranks = data.get("rank_rng")
        if not isinstance(ranks, list) or len(ranks) != world:
            raise damaged(path, "rank_rng", f"does not hold one generator state for each of the "
                          f"{world} processes")
        for state in ranks:
            _check_rng(state, path, "rank_rng")
    pending = data.get("eval_pending", False)
    if not (isinstance(pending, bool) or isinstance(pending, str) and pending in EVALUATIONS):
        raise damaged(path, "eval_pending", f"is {data['eval_pending']!r}, not false, "
                      "'periodic' or 'whole' (older files: true)")
    scaler = data.get("scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(
            _is_number(v) and math.isfinite(v) for v in scaler.values())):
        raise damaged(path, "scaler", "is not a loss scaler's state (numbers)")


def corpus_changed(saved: Any, data) -> str | None:
    """How the corpus now (a `charlm.data.dataset.Dataset`) differs from the one a checkpoint
    was trained on (its `corpus` entry), or None: another length, or the same length and
    other characters (checkpoints without a digest are compared by length only)."""
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("num_tokens") not in (None, data.num_tokens):
        return f"it has {data.num_tokens} tokens, the text trained on had {saved['num_tokens']}"
    if saved.get("sha256") not in (None, data.digest):
        return (f"its tokens hash to sha256 {data.digest}, the text trained on to "
                f"{saved['sha256']}")
    return None


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


def check_vocab_size(where: str, tokens: int, said: object) -> None:
    """Refuse a checkpoint whose vocabulary and model config disagree on the vocabulary size."""
    if tokens != said:
        raise CharlmError(f"{where}: its vocabulary has {tokens} tokens but its model config says "
                          f"{said}; the file is damaged")


def expected_shapes(model_config) -> dict[str, tuple[int, ...]]:
    """Each weight's name and shape for `model_config` (a checked ModelConfig), from a model
    built on the meta device: no memory used, whatever sizes a hostile file names. All
    implementations name and shape their weights alike, so torch's own stands for each (scratch
    where only it has the variant)."""
    from charlm.model.config import ModelConfig
    from charlm.model.lm import CharLM

    impl = "scratch" if model_config.gru_reset == "before" else "fused"
    with torch.device("meta"):
        model = CharLM(ModelConfig(**{**model_config.to_dict(), "impl": impl}))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_parameters(where: str, expected: dict[str, tuple[int, ...]] | torch.nn.Module,
                     saved: object) -> None:
    """Refuse, naming the parameter, saved weights whose names, shapes or values do not fit the
    model: ``expected`` is its weights' shapes (`expected_shapes`: call this before building a
    model from a saved config) or the model itself. One-line CharlmErrors that start with
    ``where``, e.g. the checkpoint's path.

    With step 1 (every saved tensor holds the elements it declares), equal names and shapes bound
    the model a config may ask for by what the file holds: its element count is the file's."""
    if isinstance(expected, torch.nn.Module):
        expected = {name: tuple(t.shape) for name, t in expected.state_dict().items()}
    if not isinstance(saved, dict):
        raise CharlmError(f"{where}: its 'model' entry is not a table of tensors; the file is damaged")
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
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise CharlmError(
                f"{where}: parameter {name} is {shape} but its model config gives "
                f"{want}; the file is damaged"
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
