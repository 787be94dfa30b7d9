"""`charlm plot`: learning curves (train and validation perplexity) of one or more runs, as a PNG.

              <the run, or "Perplexity of N runs">, on <the corpus>
    +--------------------------------+--------------------------------+
    | perplexity vs step  (log y)    | perplexity vs training time    |
    |  train: the run's light colour |  (same curves, x = training    |
    |  validation estimates: its     |   time, evaluation pauses      |
    |   dark colour, o markers       |   excluded, as metrics.jsonl)  |
    |  exact validation: a star      |                                |
    +--------------------------------+--------------------------------+
      runs: colour = run (name: cell layers x hidden, parameters, the options that differ)
      key:  train / validation (estimate) / validation, exact (whole split)

A validation row of metrics.jsonl is exact ("val_kind": "exact": the whole split, one stream, as
`charlm eval perplexity` computes it) or an estimate (anything else: the first --eval-tokens).
matplotlib is an optional extra (`pip install 'charlm-rnn[plot]'`) and is imported only here, inside
the command, with the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer

from charlm.about import install_extra
from charlm.artifacts import rundir
from charlm.errors import CharlmError, UsageError, warn
from charlm.system.files import atomic_write

MISSING_MATPLOTLIB = f"charlm plot needs matplotlib: {install_extra('plot')}"


@dataclass
class Curves:
    name: str
    train: list[tuple[int, float, float]] = field(default_factory=list)  # (step, time, ppl)
    val: list[tuple[int, float, float]] = field(default_factory=list)  # estimates
    exact: list[tuple[int, float, float]] = field(default_factory=list)  # the whole split
    parameters: int | None = None  # the model's, from the summary row
    label: str = ""  # what the legend calls the run (name: model, what differs)


def resolve_runs(targets: list[Path] | None) -> list[Path]:
    """The run directories to plot: those given, or the latest run."""
    if not targets:
        return [rundir.require_latest_run("pass RUN_DIR")]
    runs = []
    for target in targets:
        target = Path(target)
        if target.is_file() and target.name == "latest":
            target = rundir.require_latest_run("pass RUN_DIR", target)
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
    """The train and val curves of a run's metrics.jsonl. Damaged rows (not JSON, not a row, a
    step, time or perplexity that is not a number) are skipped with one warning; a last line
    still being written (no newline yet, the run is live) is skipped quietly."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise CharlmError(f"{run} has no metrics.jsonl; is it a charlm run directory?")
    try:
        lines = path.read_bytes().decode("utf-8", "replace").split("\n")[:-1]
    except OSError as exc:
        raise CharlmError(f"cannot read {path}: {exc.strerror}") from None
    curves, damaged = Curves(name), 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            point = _curve_point(row)
        except (ValueError, RecursionError):  # not JSON (or nested too deep), or not ours
            damaged += 1
            continue
        if row.get("kind") == "summary" and isinstance(row.get("parameters"), int):
            curves.parameters = row["parameters"]
        if point is not None:
            getattr(curves, point[0]).append(point[1:])
    if damaged:
        warn(f"skipped {damaged} damaged row{'s' if damaged > 1 else ''} of {path}")
    if not (curves.train or curves.val or curves.exact):
        raise CharlmError(
            f"{path} holds no train or validation rows yet; let the run log at least once "
            "(every --log-every steps)"
        )
    return curves


def _curve_point(row) -> tuple | None:
    """(curve, step, time, ppl) of a train or val row, the curve "train", "val" (an estimate) or
    "exact"; None for other rows (the summary, an evaluation without a finite loss);
    ValueError for a damaged one."""
    if not isinstance(row, dict):
        raise ValueError("not a row")
    kind, ppl = row.get("kind"), row.get("ppl")
    if kind not in ("train", "val") or (kind == "val" and ppl is None):
        return None
    if kind == "val" and row.get("val_kind") == "exact":
        kind = "exact"
    step, seconds = row.get("step", 0), row.get("time", 0.0)
    numbers = (step, seconds, ppl)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or not (
            isinstance(step, int) and step >= 0 and all(math.isfinite(v) for v in numbers)):
        raise ValueError("not a curve point")
    return kind, step, float(seconds), float(ppl)


# what differs between runs but says nothing about their curves stays out of the legend
NOT_IN_LABELS = frozenset((
    "out", "data_dir", "tensorboard", "threads", "log_every", "checkpoint_every", "eval_every",
    "download_timeout", "download_min_rate", "sample_prefix", "sample_length", "sha256",
    "cell", "hidden", "layers"))  # the last three: every label says them


def run_options(run: Path) -> dict:
    """A run's resolved options, from its config.toml with the tables flattened ({} when the run
    has none, or one that is not TOML)."""
    try:
        raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    flat: dict = {}
    for key, value in raw.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def corpus_of(options: dict) -> str:
    """What a run trained on, as a title says it: the corpus name, the files' names, or the URL."""
    if options.get("corpus"):
        return str(options["corpus"])
    texts = options.get("text") or []
    if texts and isinstance(texts, list):
        return ", ".join(Path(str(t)).name for t in texts)
    return str(options.get("url") or "")


def model_of(options: dict, parameters: int | None) -> str:
    """'GRU 2x256, 0.8M parameters': the cell, layers x hidden units and size of a run's model."""
    if not all(k in options for k in ("cell", "layers", "hidden")):
        return ""
    text = f"{str(options['cell']).upper()} {options['layers']}\u00d7{options['hidden']}"
    if parameters:
        size = f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else f"{parameters / 1e3:.1f}k"
        text += f", {size} parameters"
    return text


def label_runs(curves: list[Curves], options: list[dict]) -> None:
    """Each run's legend label: its name, its model, and the options (up to three) in which the
    runs plotted together differ, so that two runs never read alike."""
    # a key some runs lack is one that does not apply to their cell (gru_reset for an LSTM)
    keys = sorted(set.intersection(*(set(o) for o in options)) - NOT_IN_LABELS)
    differ = [k for k in keys if len({json.dumps(o.get(k), sort_keys=True) for o in options}) > 1]
    for c, o in zip(curves, options):
        said = [f"{k.replace('_', '-')} {_short(o.get(k))}" for k in differ[:3]]
        said += ["..."] if len(differ) > 3 else []
        model = model_of(o, c.parameters)
        c.label = c.name + (f" ({model})" if model else "") + "".join(f", {x}" for x in said)


def _short(value) -> str:
    if isinstance(value, list):
        return ", ".join(Path(str(v)).name for v in value) or "none"
    return "none" if value is None else str(value)


def title_of(curves: list[Curves], options: list[dict]) -> str:
    corpora = {corpus_of(o) for o in options}
    on = f" on {corpora.pop()}" if len(corpora) == 1 and "" not in corpora else ""
    if len(curves) == 1:
        return f"Perplexity of {curves[0].label}{on}"
    return f"Perplexity of {len(curves)} runs{on}"


def colours(index: int) -> tuple[tuple, tuple]:
    """(dark, light): a run's validation and train colours, a pair of matplotlib's tab20 (the
    dark ones are the default cycle's C0, C1, ...)."""
    from matplotlib import colormaps

    pairs = colormaps["tab20"].colors
    return pairs[(2 * index) % 20], pairs[(2 * index + 1) % 20]


def time_unit(longest: float) -> tuple[float, str]:
    """Seconds per unit and the unit the time axis reads best in."""
    return (3600.0, "h") if longest >= 7200 else (60.0, "min") if longest >= 120 else (1.0, "s")


def render(curves: list[Curves], out: Path, log_y: bool = True, title: str = "") -> Path:
    """Draw the figure and write the PNG atomically; returns `out`."""
    _write_png(figure(curves, log_y, title), out)
    return out


def figure(curves: list[Curves], log_y: bool = True, title: str = ""):
    """The figure: two panels (by step, by training time), a title, a key and the runs."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import LogFormatter
    except ImportError:
        raise CharlmError(MISSING_MATPLOTLIB) from None

    fig = Figure(figsize=(12, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    longest = max((p[1] for c in curves for p in c.train + c.val + c.exact), default=0.0)
    per, unit = time_unit(longest)
    for index, c in enumerate(curves):
        dark, light = colours(index)
        for ax, x, scale in ((by_step, 0, 1.0), (by_time, 1, per)):
            def xs(points):
                return [p[x] / scale for p in points]
            if c.train:
                ax.plot(xs(c.train), [p[2] for p in c.train], color=light, linewidth=1.4, zorder=2)
            if c.val:
                ax.plot(xs(c.val), [p[2] for p in c.val], color=dark, linewidth=1.8,
                        marker="o", markersize=4.5, zorder=3)
            if c.exact:
                ax.plot(xs(c.exact), [p[2] for p in c.exact], linestyle="none", marker="*",
                        markersize=16, color=dark, markeredgecolor="black",
                        markeredgewidth=0.8, zorder=4)
    by_step.set(title="by step", xlabel="step",
                ylabel="perplexity" + (" (log scale)" if log_y else ""))
    by_time.set(title="by training time", xlabel=f"training time ({unit}, evaluations excluded)")
    for ax in (by_step, by_time):
        if log_y:
            ax.set_yscale("log")
            # plain numbers (40, 60) instead of 4x10^1 on the short ranges perplexity spans
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    fig.suptitle(title or title_of(curves, [{}] * len(curves)), fontsize="large")
    one = len(curves) == 1
    dark, light = colours(0) if one else ("0.2", "0.65")
    key = [Line2D([], [], color=light, linewidth=1.4, label="train (mean over each log interval)"),
           Line2D([], [], color=dark, linewidth=1.8, marker="o", markersize=4.5,
                  label="validation, estimate (first --eval-tokens of the split)")]
    if any(c.exact for c in curves):
        key.append(Line2D([], [], linestyle="none", marker="*", markersize=13, color=dark,
                          markeredgecolor="black", markeredgewidth=0.8,
                          label="validation, exact (whole split, as eval perplexity)"))
    fig.legend(handles=key, loc="outside lower right", fontsize="small", frameon=False)
    if not one:
        runs = [Line2D([], [], color=colours(i)[0], linewidth=3, label=c.label)
                for i, c in enumerate(curves)]
        fig.legend(handles=runs, loc="outside lower left", fontsize="small", frameon=False)
    return fig


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
    log_y: bool = typer.Option(True, "--log-y/--linear-y",
                               help="Perplexity on a logarithmic axis, or a linear one."),
) -> None:
    """Plot train and validation perplexity against steps and training time as a PNG.

    Validation estimates (the first --eval-tokens, while training) are drawn as a line with
    dots, the exact whole-split figures (as eval perplexity computes them) as stars.

    Example: charlm plot runs/run-a runs/run-b --out compare.png
    """
    runs = resolve_runs(run_dirs)
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    curves = [read_curves(run, name) for run, name in zip(runs, _names(runs))]
    options = [run_options(run) for run in runs]
    label_runs(curves, options)
    if out is None:
        out = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    render(curves, out, log_y, title_of(curves, options))
    typer.echo(f"wrote {out} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
