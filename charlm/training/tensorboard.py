"""TensorBoard logs of a run (`charlm train --tensorboard [DIR]`), through torch.utils.tensorboard.

The rows the trainer writes to metrics.jsonl become scalars, at their step:

    train row   loss/train  perplexity/train  bits_per_char/train  learning_rate  tokens_per_s
                grad_norm (the last step's, before clipping)
    val row     loss/val_estimate  perplexity/val_estimate  bits_per_char/val_estimate
                    (the periodic estimates: charlm.training.validation)
                loss/val_exact  perplexity/val_exact  bits_per_char/val_exact  (the end of a run:
                    best.pt, as `charlm eval perplexity` scores it)
                a byte-level model's rows also bits_per_byte/val_estimate, .../val_exact
    sample      text "sample" (preformatted), at each evaluation; text "config" once, at the start

`tensorboard --logdir runs` then shows every run that logged inside its run directory. A resumed
run purges the events past its checkpoint's step, which the run had logged before it stopped and
will log again.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
from contextlib import ExitStack, closing
from pathlib import Path

from charlm.about import install_extra
from charlm.errors import CharlmError

EXTRA = "tensorboard"
RUN_DIR = "RUN_DIR"  # a value that starts with it names a folder inside the run directory
OFF = "off"  # no logs: what a resumed run of a logging run passes to stop logging
TRAIN = {"loss": "loss/train", "ppl": "perplexity/train", "lr": "learning_rate",
         "tokens_per_s": "tokens_per_s", "grad_norm": "grad_norm"}
VAL = {"loss": "loss/val", "ppl": "perplexity/val", "bpc": "bits_per_char/val",
       "bits_per_byte": "bits_per_byte/val"}
VAL_KINDS = {kind: {key: f"{tag}_{kind}" for key, tag in VAL.items()}
             for kind in ("estimate", "exact")}


def require(value: str | None) -> None:
    """Refuse --tensorboard, before anything is written, where the tensorboard package is not."""
    if value not in (None, OFF) and importlib.util.find_spec("tensorboard") is None:
        raise CharlmError(f"--tensorboard needs the tensorboard package: install the "
                          f"{EXTRA} extra with {install_extra(EXTRA)} (or log nothing: "
                          f"--tensorboard {OFF})")


def log_dir(value: str, run_dir: Path) -> Path:
    """RUN_DIR/x -> run_dir/x; anything else is a path of its own."""
    head, _, rest = value.replace("\\", "/").partition("/")
    if head == RUN_DIR:
        return run_dir / rest if rest else run_dir
    return Path(value)


def make_log_dir(value: str | None, run_dir: Path) -> None:
    """Create --tensorboard's folder before anything of the run is written, so that a DIR which
    cannot be one (a file on its path, no permission) is refused with nothing half-written. One
    inside a run directory not made yet is made with it (an empty directory has room for it)."""
    if value in (None, OFF):
        return
    directory = log_dir(value, run_dir)
    if not run_dir.is_dir() and directory.resolve().is_relative_to(run_dir.resolve()):
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise _refused(directory, exc) from None


def _refused(directory: Path, exc: OSError) -> CharlmError:
    return CharlmError(f"cannot write TensorBoard logs in {directory}: {exc.strerror or exc}; "
                       "choose another --tensorboard DIR")


class Board:
    enabled = True

    def __init__(self, directory: Path, resumed_at: int | None, config_toml: str):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at + 1 if resumed_at is not None else None
        try:
            self.writer = SummaryWriter(str(directory), purge_step=purge, flush_secs=10)
        except OSError as exc:
            raise _refused(directory, exc) from None
        self.directory = directory
        if resumed_at is None:
            self.writer.add_text("config", _preformatted(config_toml), 0)

    def write(self, row: dict) -> None:
        """A metrics.jsonl row ("train" or "val") as scalars."""
        names = {"train": TRAIN, "val": VAL_KINDS[row.get("val_kind", "estimate")]}.get(
            row.get("kind"), {})
        values = {tag: row.get(key) for key, tag in names.items()}
        if row.get("kind") == "train" and row.get("loss") is not None:
            values["bits_per_char/train"] = row["loss"] / math.log(2)
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, row["step"])

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("sample", _preformatted(text), step)
        self.writer.flush()  # an evaluation is a moment a person looks

    def close(self) -> None:
        self.writer.close()


def _preformatted(text: str) -> str:
    """TensorBoard renders text as Markdown: four spaces keep a sample's characters as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


class _NoBoard:
    """What a run without --tensorboard (and every rank but 0) logs to."""

    enabled = False

    def write(self, row: dict) -> None:
        pass

    def sample(self, step: int, text: str) -> None:
        pass


NO_BOARD = _NoBoard()


def open_board(stack: ExitStack, value: str | None, run_dir: Path, resumed_at: int | None,
               config_toml: str) -> Board | _NoBoard:
    """The run's TensorBoard log for the life of `stack` (NO_BOARD without --tensorboard)."""
    if value in (None, OFF):
        return NO_BOARD
    return stack.enter_context(closing(Board(log_dir(value, run_dir), resumed_at, config_toml)))
