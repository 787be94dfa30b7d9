"""Run directories: layout, atomic writes, the single-writer lock, metrics.jsonl, `latest`.

    runs/
      latest                         one line: the path of the newest run directory
      20261123-101500-gru-timemachine/
        config.toml                  the resolved configuration (rerun with --config)
        metrics.jsonl                one JSON row per log / evaluation
        samples.txt                  the sample printed at each evaluation
        last.pt                      newest checkpoint (every --checkpoint-every steps, at the end)
        best.pt                      checkpoint with the lowest validation loss so far
        run.lock                     held (flock) while a trainer writes here
        .last.pt.<pid>.<hex>.tmp     only if that trainer was killed mid-save; the next one
                                     to take the lock deletes it
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from contextlib import ExitStack, closing
from pathlib import Path

from charlm.errors import CharlmError
from charlm.system.files import atomic_write, remove_stale_temp_files, write_text_atomic

RUNS_ROOT_ENV = "CHARLM_RUNS_DIR"


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ROOT_ENV, "runs"))


def default_run_dir(cell: str, corpus: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in corpus)[:40] or "text"
    base = runs_root() / f"{stamp}-{cell}-{safe}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# A temp file names its writer, so a crashed writer's leftovers can be told from a live one's:
#   .<name>.<pid>.<8 hex>.tmp


def prepare_run_dir(path: Path, resuming: bool) -> Path:
    """Create (or, when resuming, reuse) a run directory; refuse to overwrite someone's run."""
    if path.exists() and not path.is_dir():
        raise CharlmError(f"--out {path} exists and is not a directory; choose another --out")
    if not resuming and path.is_dir() and any((path / n).exists() for n in ("last.pt", "best.pt")):
        raise CharlmError(
            f"{path} already holds a run; continue it with `charlm train --resume {path}` "
            "or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CharlmError(f"cannot create run directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CharlmError(f"run directory {path} is not writable; choose another --out")
    return path


class RunLock:
    """An exclusive flock on run.lock: a second trainer on the same directory is refused.

    The kernel drops the lock when the process dies, even by SIGKILL, so a crash never leaves
    a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.lock"
        self.fh = None

    def __enter__(self) -> "RunLock":
        try:
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise CharlmError(f"cannot write in {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise CharlmError(
                f"{self.path.parent} is in use by a running trainer (pid {owner}); "
                "wait for it to finish or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        remove_stale_temp_files(self.path.parent)  # left by a trainer killed mid-write
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class MetricsLog:
    """Append-only metrics.jsonl; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            rows = [r for r in read_metrics(path) if _step_of(r) <= keep_until_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        try:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
        except OSError as exc:  # a full disk, most likely: say which file, and what is safe
            raise CharlmError(f"cannot write {self.path}: {exc.strerror or exc}; the run's "
                              "checkpoints are intact") from None

    def close(self) -> None:
        self.fh.close()


class _NoMetrics:
    """What ranks other than 0 write metrics to."""

    def write(self, row: dict) -> None:
        pass


NO_METRICS = _NoMetrics()


def _step_of(row: dict) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


_SAMPLE = re.compile(rb"^--- step (\d+)\n", re.MULTILINE)  # starts an entry of samples.txt


def cut_samples(path: Path, keep_until_step: int) -> None:
    """Drop the entries of samples.txt ("--- step N", then the sample) past `keep_until_step`,
    as MetricsLog drops rows: a resumed run draws them again. Rewritten atomically."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    heads = list(_SAMPLE.finditer(data))
    ends = [head.start() for head in heads[1:]] + [len(data)]
    kept = data[: heads[0].start()] if heads else data
    kept += b"".join(data[head.start():end] for head, end in zip(heads, ends)
                     if int(head[1]) <= keep_until_step)
    if kept != data:
        atomic_write(path, lambda fh: fh.write(kept))


def open_run(stack: ExitStack, run_dir: Path, config_toml: str, resumed_at: int | None) -> MetricsLog:
    """Make (or, resuming, reuse) a run directory and hold it for the life of `stack`: the lock,
    config.toml, the `latest` pointer, and metrics.jsonl and samples.txt (cut back to
    `resumed_at` on resume, emptied for a new run)."""
    prepare_run_dir(run_dir, resuming=resumed_at is not None)
    stack.enter_context(RunLock(run_dir))
    write_text_atomic(run_dir / "config.toml", config_toml)
    point_latest(run_dir)
    keep = -1 if resumed_at is None else resumed_at
    cut_samples(run_dir / "samples.txt", keep)
    return stack.enter_context(closing(MetricsLog(run_dir / "metrics.jsonl", keep_until_step=keep)))


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a crash mid-write), or any line that is not a
    JSON object (a damaged or edited file), is skipped."""
    rows = []
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def latest_run(root: Path | None = None) -> Path | None:
    """The run directory `runs/latest` names, if it still exists."""
    pointer = (root if root is not None else runs_root()) / "latest"
    named = _named(pointer)
    if not named:
        return None
    run = Path(named) if Path(named).is_absolute() else pointer.parent / named
    return run if run.is_dir() else None


def _named(pointer: Path) -> str:
    """What a `latest` pointer says ('' when it is missing or unreadable)."""
    try:  # a path in the file system's own bytes (any encoding), and never more than a path
        with open(pointer, "rb") as fh:
            return os.fsdecode(fh.read(1 << 16).strip())
    except (OSError, ValueError):
        return ""


RUN_FILES = ("metrics.jsonl", "last.pt", "best.pt")  # a directory holding one is a run


def newest_run(root: Path) -> Path | None:
    """The run directory in `root` written to last (its metrics or checkpoints), if any."""
    newest, when = None, -math.inf
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return None
    for folder in folders:
        for name in RUN_FILES:
            try:
                mtime = (folder / name).stat().st_mtime
            except OSError:
                continue
            if mtime > when:
                newest, when = folder, mtime
    return newest


def require_latest_run(how_to_name: str, pointer: Path | None = None) -> Path:
    """The run `latest` names, or an error that says why there is none: no runs yet, or the
    pointer names a run that is gone (or is missing); then it names the newest run there is.
    `how_to_name` ends the error: how this command takes a path (e.g. "pass --checkpoint PATH")."""
    pointer = pointer if pointer is not None else runs_root() / "latest"
    root = pointer.parent
    run = latest_run(root)
    if run is not None:
        return run
    named = _named(pointer)
    newest = newest_run(root)
    if not named and newest is None:
        raise CharlmError(f"no runs yet in {root}/: train one first with `charlm train`, or "
                          f"{how_to_name}")
    said = (f"{pointer} names {named}, which no longer exists" if named
            else f"{pointer} is missing")
    if newest is None:
        raise CharlmError(f"{said}, and {root}/ holds no other run: train one with `charlm "
                          f"train`, or {how_to_name}")
    raise CharlmError(f"{said}; the newest run in {root}/ is {newest}: {how_to_name}")


def point_latest(run_dir: Path) -> None:
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(root, min_age=60.0)
    atomic_write(root / "latest", lambda fh: fh.write(os.fsencode(run_dir.resolve()) + b"\n"))
