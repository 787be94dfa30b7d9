"""`charlm.train(...)`: a training run from Python, and the core `charlm train` hands over to.

    import charlm
    run = charlm.train(text="notes.txt", hidden=64, max_steps=300)   # charlm train's options
    run.summary["best_val_ppl"], run.best_checkpoint                  # what the run left
    model = run.load()                                                # -> charlm.Model

The options are `charlm train`'s, declared once in `charlm.config.train.TrainConfig`, with the
same precedence (defaults < `config`, a TOML file or a dict < the keyword options) and checks
(`build_config`); a name that is no option is refused, with the closest ones. Progress shows as a
tqdm bar (tqdm.auto: a widget in a notebook, text in a terminal), or not at all with quiet=True;
`callback(row)` gets each metrics row (a log point's "train" row, an evaluation's "val" row, the
end's exact figure) as it is written to metrics.jsonl.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from charlm.config.build import build_config, type_ok
from charlm.config.file import load_config_file, type_name
from charlm.config.train import OPTIONS, TrainConfig, base_type
from charlm.errors import UsageError
from charlm.training.display import TrainDisplay
from charlm.training.signals import Interrupted

if TYPE_CHECKING:
    from charlm.inference.model import Model
    from charlm.training.distributed import Group

Row = dict[str, Any]
API_ARGUMENTS = ("config", "quiet", "callback", "resume")


@dataclass
class RunResult:
    """What a run left: its folder, checkpoints and summary figures (`charlm train --json`'s)."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    summary: dict
    config: TrainConfig

    @classmethod
    def of(cls, summary: dict, config: TrainConfig) -> "RunResult":
        return cls(Path(summary["run_dir"]), Path(summary["best_checkpoint"]),
                   Path(summary["last_checkpoint"]), summary, config)

    def load(self, which: str = "best", device: str = "auto", impl: str | None = None,
             weights: str = "auto") -> "Model":
        """The run's model: its best checkpoint (which="last": the last one) as `charlm.load`
        gives it."""
        from charlm.inference.model import Model

        if which not in ("best", "last"):
            raise UsageError(f"which must be best or last; got {which!r}")
        path = self.best_checkpoint if which == "best" else self.last_checkpoint
        return Model.load(path, device, impl, weights)

    def metrics(self) -> list[Row]:
        """The rows of the run's metrics.jsonl (train, val and summary rows)."""
        from charlm.artifacts.rundir import read_metrics

        return read_metrics(self.run_dir / "metrics.jsonl")

    def __repr__(self) -> str:
        s = self.summary
        ppl = s.get("val_ppl")
        return (f"<charlm.RunResult {self.run_dir}: {s.get('steps')} steps, val ppl "
                f"{ppl:.4f}>" if isinstance(ppl, float) else
                f"<charlm.RunResult {self.run_dir}: {s.get('steps')} steps>")


class NotebookDisplay(TrainDisplay):
    """A run's progress as a tqdm bar (`tqdm.auto`), its other lines written beside it; each
    metrics row also goes to `callback`, shown or not."""

    def __init__(self, callback: Callable[[Row], None] | None = None, show: bool = True):
        super().__init__(enabled=show)
        self.live = False  # rich's live line: the bar stands in for it
        self.callback = callback
        self.bar = None

    def print(self, *args, **kwargs) -> None:
        if self.bar is not None and self.enabled:
            self.bar.write(" ".join(str(a) for a in args), file=sys.stderr)
        else:
            super().print(*args, **kwargs)

    def start(self, run) -> None:
        super().start(run)
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, desc="training", file=sys.stderr, leave=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
                                       "{postfix}")

    def _advance(self, progress: float) -> None:
        if self.bar is not None:
            self.bar.update(max(0, min(1000, int(progress * 1000)) - self.bar.n))

    def tick(self, step: int, epochs: float, progress: float, eta: float | None) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epochs {epochs:.2f} step {step}", refresh=False)
        self._advance(progress)

    def _row(self, row: dict | None) -> None:
        if self.callback is not None and row is not None:
            self.callback(dict(row))

    def log(self, row: dict, progress: float, *args, **kwargs) -> None:
        self._row(row)
        if self.bar is not None:
            self.bar.set_postfix_str(f"ppl {row['ppl']:.3f}, lr {row['lr']:.2e}", refresh=False)
        self._advance(progress)

    def evaluation(self, row: dict, *args, **kwargs) -> None:
        self._row(row)
        super().evaluation(row, *args, **kwargs)

    def exact(self, row: dict | None) -> None:
        self._row(row)
        super().exact(row)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def configure(options: Mapping[str, Any], config_file: str | os.PathLike | None = None,
              file_values: Mapping[str, Any] | None = None,
              resume: str | None = None) -> tuple[TrainConfig, dict | None]:
    """The run's configuration: the defaults < `config_file` (TOML) or `file_values` < `options`,
    checked; with `resume` ("latest", a run folder or a checkpoint) the checkpoint's own, the
    options laid over it. Returns it and, resuming, the checkpoint for `Trainer`."""
    values = dict(file_values or {})
    if config_file is not None:
        values.update(load_config_file(config_file))
    if resume is not None:  # (the checkpoint is read: torch comes in; a new run's needs none)
        from charlm.training.state import resolve_resume

        if "out" in options:
            raise UsageError("--out cannot be combined with --resume (a run resumes in its own "
                             "directory)")
        return resolve_resume({**values, **options}, resume)
    return build_config(values, dict(options)), None


def run_training(cfg: TrainConfig, resumed: dict | None, display: TrainDisplay,
                 group: "Group | None" = None) -> dict:
    """Train `cfg` to its limit; the summary (`charlm train --json`'s figures). A stop request
    (Ctrl-C, SIGTERM) raises `Interrupted` once last.pt is saved."""
    from charlm.training.trainer import Trainer

    return Trainer(cfg, resume=resumed, display=display, group=group).run()


def checked_options(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Options given in Python, by name: each must be a TrainConfig field (else the closest
    names), with a value of its type; a single file or Path for a list option is a list of
    one, a Path a string."""
    out = {}
    for name, value in values.items():
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, [*OPTIONS, *API_ARGUMENTS], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else (
                "; the options are charlm train's, with - written as _ (charlm train --help)")
            raise UsageError(f"unknown option {name!r} {where}{hint}")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if getattr(base_type(name), "__origin__", None) is list and isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        if not type_ok(name, value):
            raise UsageError(f"option {name} {where} must be {type_name(name)}, got {value!r}")
        out[name] = value
    return out


def train(config: str | os.PathLike | Mapping[str, Any] | TrainConfig | None = None, *,
          quiet: bool = False, callback: Callable[[Row], None] | None = None,
          resume: str | os.PathLike | None = None, **options: Any) -> RunResult:
    """Train a model as `charlm train` does; returns the run's `RunResult`.

    `config`: a TOML config file (`--config`), a dict of options or a TrainConfig, under the
    keyword `options` (charlm train's, - written as _: hidden=64, max_steps=300,
    text="notes.txt", ...). `quiet`: no progress bar. `callback(row)`: each metrics row as it
    is written. `resume`: continue a run ("latest", its folder or a checkpoint), as `--resume`.
    A stop request (Ctrl-C, a notebook's interrupt) ends the run at the next step boundary with
    last.pt saved, then raises KeyboardInterrupt saying how to resume.
    """
    given = checked_options(options, "for charlm.train")
    config_file, file_values = None, None
    if isinstance(config, TrainConfig):
        file_values = checked_options(config.to_dict(), "in the TrainConfig")
    elif isinstance(config, Mapping):
        file_values = checked_options(config, "in the config dict")
    elif config is not None:
        config_file = config
    cfg, resumed = configure(given, config_file, file_values,
                             None if resume is None else os.fspath(resume))
    display = NotebookDisplay(callback, show=not quiet)
    try:
        summary = run_training(cfg, resumed, display)
    except Interrupted as exc:
        display.stop()
        where = (f"saved {exc.checkpoint} at step {exc.step}; resume with "
                 f"charlm.train(resume={str(exc.checkpoint.parent)!r})"
                 if exc.checkpoint else "no checkpoint was saved")
        raise KeyboardInterrupt(f"{exc.signame}: {where}") from None
    return RunResult.of(summary, cfg)


__all__ = ["train", "RunResult", "NotebookDisplay", "configure", "run_training"]
