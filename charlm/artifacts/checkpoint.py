"""Checkpoints: plain data only, written atomically, read with torch.load(weights_only=True).

A checkpoint is one dict:

    format            "charlm-checkpoint"
    version           FORMAT_VERSION (a newer version is refused with a clear message)
    model_config      ModelConfig as a dict  -> rebuilds the model
    vocab             Vocab.to_dict()        -> {"tokens": [...], ...}
    preprocessing     "d2l" | "lower" | "raw" | "bytes"
    model             state_dict (tensors)
    optimizer         optimizer.state_dict()
    scheduler         LRSchedule.state_dict() (numbers)
    ema               None, or {"decay", "updates", "model": averaged weights} (--ema)
    rng               {"torch": ByteTensor, "python": [...], and on a GPU "device": "cuda" | "mps",
                      "device_rng": the training device's generator} (older: "cuda": every GPU's)
    iterator          batch iterator state (ints)
    hidden            carried hidden state (float32 tensor, or [h, c]) for exact resume, or None
    step, epoch, tokens_seen, elapsed, best_val_loss, eval_pending (the evaluation of this
                      step a stop request cut short, "periodic" or "whole", else false; older
                      files: true for the periodic one): the resumed run does that one first
    train_config      TrainConfig as a dict
    corpus            {"name", "source", "num_tokens", "sha256" (of the token ids, as int32),
                      "splits": {...}}
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from charlm.artifacts.fields import check_fields
from charlm.artifacts.folder import is_model_folder
from charlm.artifacts.rundir import require_latest_run
from charlm.errors import CharlmError
from charlm.system.files import atomic_write

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (see `atomic_write`): the previous file at `path` survives any failure."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; anything that is not one of ours is a one-line CharlmError."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory, not a checkpoint file")
    if not _looks_like_torch_file(path):
        raise CharlmError(f"{path} is not a charlm checkpoint (not a file written by torch.save)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CharlmError(
                f"{path} holds code objects, not plain data; refusing to load it "
                "(charlm checkpoints hold only tensors, numbers, strings, lists and dicts)"
            ) from None
        raise CharlmError(f"{path} is not a charlm checkpoint ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _looks_like_torch_zip(path) or isinstance(exc, EOFError):
            raise CharlmError(
                f"{path} is truncated or damaged ({text}); use another checkpoint, e.g. best.pt "
                "or last.pt of the same run"
            ) from None
        raise CharlmError(f"{path} is not a charlm checkpoint ({text})") from None
    except Exception as exc:  # any other unpickling failure is still "not ours"
        raise CharlmError(f"{path} is not a charlm checkpoint ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CharlmError(f"{path} is not a charlm checkpoint (no '{FORMAT}' header)")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CharlmError(f"{path} has no valid format version; the file is damaged")
    if version > FORMAT_VERSION:
        raise CharlmError(
            f"{path} is checkpoint format version {version}, newer than this charlm reads "
            f"({FORMAT_VERSION}); upgrade charlm"
        )
    for key in ("model_config", "vocab", "model"):
        if key not in data:
            raise CharlmError(f"{path} lacks '{key}'; the file is damaged")
    check_fields(data, path)
    return data


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive; older torch wrote a pickle (protocol 2+: byte 0x80)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # let torch.load report the error
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _looks_like_torch_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a file that starts like one but fails to load is torn."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def find_checkpoint(target: str | Path | None, prefer: str = "best.pt",
                    how_to_name: str = "pass --checkpoint PATH", exported: bool = False) -> Path:
    """A checkpoint file, a run directory (its best.pt, else last.pt) or, with None, the latest run;
    with `exported`, also a folder written by `charlm export` (the folder itself is returned).

    `how_to_name` ends the error when there is no run yet: how this command takes a path.
    """
    if target is None:
        target = require_latest_run(how_to_name)
    target = Path(target)
    if is_model_folder(target):
        if exported:
            return target
        raise CharlmError(
            f"{target} is an exported model: it holds the weights but no training state, so a run "
            "cannot continue from it; resume from the run directory it was exported from"
        )
    if target.is_dir():
        for name in (prefer, "best.pt", "last.pt"):
            if (target / name).is_file():
                return target / name
        raise CharlmError(f"run directory {target} holds no checkpoint (best.pt or last.pt)")
    if not target.exists():
        raise CharlmError(f"checkpoint or run directory {target} does not exist")
    return target
