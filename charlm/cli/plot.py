"""`charlm plot`: learning curves (train and validation perplexity) of one or more runs, as a PNG.

    +--------------------------------+--------------------------------+
    | perplexity vs step             | perplexity vs training time    |
    |  run-a train --- run-a val -o- |  (same curves, x = seconds of  |
    |  run-b train --- run-b val -o- |   training, evaluation pauses  |
    |                                |   excluded, as metrics.jsonl)  |
    +--------------------------------+--------------------------------+

matplotlib is an optional extra (`pip install 'charlm[plot]'`) and is imported only here, inside
the command, with the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from charlm.artifacts import rundir
from charlm.errors import CharlmError, UsageError
from charlm.system.files import atomic_write

MISSING_MATPLOTLIB = "charlm plot needs matplotlib: pip install 'charlm[plot]'"


@dataclass
class Curves:
    name: str
    train: list[tuple[int, float, float]] = field(default_factory=list)  # (step, time, ppl)
    val: list[tuple[int, float, float]] = field(default_factory=list)


def resolve_runs(targets: list[Path] | None) -> list[Path]:
    """The run directories to plot: those given, or the latest run."""
    if not targets:
        run = rundir.latest_run()
        if run is None:
            raise CharlmError(
                f"no runs yet in {rundir.runs_root()}/: train one first with `charlm train`, or "
                "pass RUN_DIR"
            )
        return [run]
    runs = []
    for target in targets:
        target = Path(target)
        if target.is_file() and target.name == "latest":
            followed = rundir.latest_run(target.parent)
            if followed is None:
                raise CharlmError(f"{target} points to a run directory that no longer exists")
            target = followed
        elif target.is_file() and target.name == "metrics.jsonl":
            target = target.parent
        if not target.exists():
            raise CharlmError(f"run directory {target} does not exist")
        if not target.is_dir():
            raise CharlmError(
                f"{target} is not a run directory (give the directory that holds metrics.jsonl)"
            )
        runs.append(target)
    return runs


def _names(runs: list[Path]) -> list[str]:
    """Directory names; parent/name where two runs share a name. A name's bytes that are not
    UTF-8 show as U+FFFD (the figure's fonts draw text, not bytes)."""
    def shown(name: str) -> str:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    names = [shown(r.resolve().name) for r in runs]
    return [
        f"{shown(r.resolve().parent.name)}/{n}" if names.count(n) > 1 else n
        for r, n in zip(runs, names)
    ]


def read_curves(run: Path, name: str) -> Curves:
    """The train and val curves of a run's metrics.jsonl, read by `rundir.read_metrics` (its
    policy for damaged rows; here a step, time or perplexity that is not a number is damage)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise CharlmError(f"{run} has no metrics.jsonl; is it a charlm run directory?")
    curves = Curves(name)
    for kind, *point in rundir.read_metrics(path, _curve_point):
        (curves.train if kind == "train" else curves.val).append(tuple(point))
    if not curves.train and not curves.val:
        raise CharlmError(
            f"{path} holds no train or validation rows yet; let the run log at least once "
            "(every --log-every steps)"
        )
    return curves


def _curve_point(row: dict) -> tuple | None:
    """(kind, step, time, ppl) of a train or val row; None for other rows (the summary, an
    evaluation without a finite loss); ValueError for a damaged one."""
    kind, ppl = row.get("kind"), row.get("ppl")
    if kind not in ("train", "val") or (kind == "val" and ppl is None):
        return None
    step, seconds = row.get("step", 0), row.get("time", 0.0)
    numbers = (step, seconds, ppl)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or not (
            isinstance(step, int) and step >= 0 and all(math.isfinite(v) for v in numbers)):
        raise ValueError("not a curve point")
    return kind, step, float(seconds), float(ppl)


def render(curves: list[Curves], out: Path, log_y: bool = False) -> Path:
    """Draw the two panels and write the PNG atomically; returns `out`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogFormatter
    except ImportError:
        raise CharlmError(MISSING_MATPLOTLIB) from None

    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2)
    for index, c in enumerate(curves):
        color = f"C{index % 10}"
        for ax, x in ((by_step, 0), (by_time, 1)):
            if c.train:
                ax.plot([p[x] for p in c.train], [p[2] for p in c.train], color=color,
                        linewidth=1.2, label=f"{c.name} train")
            if c.val:
                ax.plot([p[x] for p in c.val], [p[2] for p in c.val], color=color, linestyle="--",
                        marker="o", markersize=3.5, linewidth=1.2, label=f"{c.name} val")
    by_step.set(title="perplexity vs step", xlabel="step", ylabel="perplexity")
    by_time.set(title="perplexity vs training time", xlabel="training time (s)", ylabel="perplexity")
    for ax in (by_step, by_time):
        if log_y:
            ax.set_yscale("log")
            # plain numbers (40, 60) instead of 4x10^1 on the short ranges perplexity spans
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.grid(True, alpha=0.3)
    by_step.legend(fontsize="small")
    _write_png(fig, out)
    return out


def _write_png(fig, out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CharlmError(f"cannot write {out}: directory {parent} does not exist")
    atomic_write(out, lambda fh: fig.savefig(fh, format="png"))


def plot_command(
    run_dirs: Optional[list[Path]] = typer.Argument(
        None, metavar="RUN_DIR",
        help="Run directories to overlay (default: the latest run).", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="PNG to write (default: RUN_DIR/curves.png for one run, ./curves.png for several).",
        show_default=False),
    log_y: bool = typer.Option(False, "--log-y", help="Logarithmic perplexity axis."),
) -> None:
    """Plot train and validation perplexity against steps and training time as a PNG.

    Example: charlm plot runs/run-a runs/run-b --out compare.png --log-y
    """
    runs = resolve_runs(run_dirs)
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    curves = [read_curves(run, name) for run, name in zip(runs, _names(runs))]
    if out is None:
        out = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    render(curves, out, log_y)
    typer.echo(f"wrote {out} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
