"""Checkpoints: plain data only, written atomically, read with torch.load(weights_only=True).

A checkpoint is one dict:

    format            "charlm-checkpoint"
    version           FORMAT_VERSION (a newer version is refused with a clear message)
    model_config      ModelConfig as a dict  -> rebuilds the model
    vocab             Vocab.to_dict()        -> {"tokens": [...], ...}
    preprocessing     "d2l" | "lower" | "raw"
    model             state_dict (tensors)
    optimizer         optimizer.state_dict()
    scheduler         LRSchedule.state_dict() (numbers)
    rng               {"torch": ByteTensor, "cuda": [ByteTensor, ...], "python": [...]}
    iterator          batch iterator state (ints)
    hidden            carried hidden state (tensor, or [h, c]) for exact resume, or None
    step, epoch, tokens_seen, elapsed, best_val_loss
    train_config      TrainConfig as a dict
    corpus            {"name", "source", "num_tokens", "splits": {...}}
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from charlm.errors import CharlmError

FORMAT = "charlm-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: temp file in the same directory, flush + fsync, rename over `path`.

    Whatever goes wrong (full disk, a write error), the previous file at `path` stays intact
    and no temp file is left behind.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; anything that is not one of ours is a one-line CharlmError."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory, not a checkpoint file")
    try:
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
    if not isinstance(version, int):
        raise CharlmError(f"{path} has no valid format version; the file is damaged")
    if version > FORMAT_VERSION:
        raise CharlmError(
            f"{path} is checkpoint format version {version}, newer than this charlm reads "
            f"({FORMAT_VERSION}); upgrade charlm"
        )
    for key in ("model_config", "vocab", "model"):
        if key not in data:
            raise CharlmError(f"{path} lacks '{key}'; the file is damaged")
    return data


def _looks_like_torch_zip(path: Path) -> bool:
    """torch.save writes a zip archive: a file that starts like one but fails to load is torn."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def find_checkpoint(target: str | Path | None, runs_root: str | Path = "runs",
                    prefer: str = "best.pt") -> Path:
    """A checkpoint file, a run directory (its best.pt, else last.pt) or, with None, the latest run."""
    if target is None:
        runs_root = Path(runs_root)
        pointer = runs_root / "latest"
        run_dir = None
        if pointer.is_file():
            named = pointer.read_text(encoding="utf-8").strip()
            candidate = Path(named) if Path(named).is_absolute() else runs_root / named
            if candidate.is_dir():
                run_dir = candidate
        if run_dir is None:
            raise CharlmError(
                f"no runs yet in {runs_root}/: train one first with `charlm train`, "
                "or pass --checkpoint PATH"
            )
        target = run_dir
    target = Path(target)
    if target.is_dir():
        for name in (prefer, "best.pt", "last.pt"):
            if (target / name).is_file():
                return target / name
        raise CharlmError(f"run directory {target} holds no checkpoint (best.pt or last.pt)")
    if not target.exists():
        raise CharlmError(f"checkpoint or run directory {target} does not exist")
    return target
