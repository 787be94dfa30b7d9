"""`charlm plot`: learning curves from real runs' metrics.jsonl, one PNG, clear one-line errors."""

from __future__ import annotations

import builtins
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.cli import plot
from charlm.artifacts import rundir
from charlm.cli.app import app
from charlm.config.build import build_config
from charlm.training.trainer import Trainer
from helpers import pydoc_text

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(
    not HAVE_MATPLOTLIB, reason="matplotlib is not installed (pip install 'charlm-rnn[plot]')")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 1200, 550  # figsize 12 x 5.5 inches at 100 dpi
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Two real 20-step runs of a tiny GRU (different learning rates); `b` is the latest."""
    root = tmp_path_factory.mktemp("plot")
    text = pydoc_text(root / "small.txt", 6000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_RUNS_DIR", str(root / "runs"))
        for name, lr in (("a", 0.01), ("b", 0.003)):
            cfg = build_config({}, {
                "text": [str(text)], "hidden": 16, "layers": 1, "embed": 8, "dropout": 0.0,
                "batch_size": 4, "num_steps": 16, "max_steps": 20, "time_budget": "0",
                "log_every": 5, "eval_every": 10, "checkpoint_every": 20, "lr": lr,
                "sample_length": 10, "impl": "fused", "out": str(root / name)})
            Trainer(cfg).run()
    return {"root": root, "runs": root / "runs", "a": root / "a", "b": root / "b"}


@pytest.fixture(autouse=True)
def runs_env(tmp_path, monkeypatch):
    """Each test starts in an empty directory with an empty runs root, unless it points elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "no-runs"))


def invoke(*args: str):
    return CliRunner().invoke(app, ["plot", *args])


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def colour_pixels(path: Path, rgb: tuple[int, int, int]) -> int:
    from PIL import Image

    with Image.open(path) as im:
        pixels = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
    return int((pixels.view(-1, 3) == torch.tensor(rgb, dtype=torch.uint8)).all(dim=1).sum())


def test_curves_are_the_metrics_rows(runs):
    curves = plot.read_curves(runs["a"], "a")
    rows = rundir.read_metrics(runs["a"] / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val" and r["val_kind"] == "estimate"]
    assert [p[0] for p in curves.train] == [5, 10, 15, 20]
    assert [p[0] for p in curves.val] == [10, 20]
    assert curves.train == [(r["step"], r["time"], r["ppl"]) for r in train]
    assert curves.val == [(r["step"], r["time"], r["ppl"]) for r in val]
    for step, _, ppl in curves.val:  # validation perplexity is exp of the logged loss
        loss = next(r["loss"] for r in val if r["step"] == step)
        assert ppl == pytest.approx(math.exp(loss), rel=1e-12)
    times = [p[1] for p in curves.train]
    assert times == sorted(times) and times[0] > 0


def without_exact_rows(run: Path, to: Path) -> Path:
    """A copy of `run` without the exact validation row its end wrote: only estimates."""
    import shutil

    shutil.copytree(run, to)
    rows = [r for r in rundir.read_metrics(to / "metrics.jsonl") if r.get("val_kind") != "exact"]
    (to / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return to


def test_exact_validation_rows_are_a_curve_of_their_own(runs):
    """A run's end writes the exact figure (val_kind "exact") after its estimates: plot draws it
    apart from the estimates' curve."""
    val = [r for r in rundir.read_metrics(runs["a"] / "metrics.jsonl") if r["kind"] == "val"]
    exact = [r for r in val if r.get("val_kind") == "exact"]
    estimates = [r for r in val if r.get("val_kind") == "estimate"]
    assert len(exact) == 1 and estimates and len(exact) + len(estimates) == len(val)
    curves = plot.read_curves(runs["a"], "a")
    assert curves.exact == [(r["step"], r["time"], r["ppl"]) for r in exact]
    assert curves.val == [(r["step"], r["time"], r["ppl"]) for r in estimates]


def test_labels_name_the_run_its_model_and_what_differs(runs):
    curves = [plot.read_curves(runs[n], n) for n in ("a", "b")]
    options = [plot.run_options(runs[n]) for n in ("a", "b")]
    plot.label_runs(curves, options)
    size = curves[0].parameters
    assert size == curves[1].parameters and 500 < size < 5000
    model = f"GRU 1\u00d716, {size / 1e3:.1f}k parameters"
    assert [c.label for c in curves] == [f"a ({model}), lr 0.01", f"b ({model}), lr 0.003"]
    assert plot.title_of(curves, options) == "Perplexity of 2 runs on small.txt"
    assert plot.title_of(curves[:1], options[:1]) == f"Perplexity of a ({model}), lr 0.01 on small.txt"


@needs_matplotlib
def test_the_figure_reads_at_a_glance(runs, tmp_path):
    """Log perplexity axis, train and validation in a light and a dark shade of the run's colour
    (validation with dots), exact figures as stars apart from the line, a key and the runs
    named in legends, a title."""
    from matplotlib.colors import to_hex

    a, b = runs["a"], without_exact_rows(runs["b"], tmp_path / "b")
    curves = [plot.read_curves(a, "a"), plot.read_curves(b, "b")]
    options = [plot.run_options(r) for r in (a, b)]
    plot.label_runs(curves, options)
    fig = plot.figure(curves, title=plot.title_of(curves, options))
    by_step, by_time = fig.axes
    assert fig.get_suptitle() == "Perplexity of 2 runs on small.txt"
    for ax in (by_step, by_time):
        assert ax.get_yscale() == "log"
        lines = ax.get_lines()
        styles = [(to_hex(l.get_color()), l.get_marker(), l.get_linestyle()) for l in lines]
        assert styles == [("#aec7e8", "None", "-"), ("#1f77b4", "o", "-"), ("#1f77b4", "*", "None"),
                          ("#ffbb78", "None", "-"), ("#ff7f0e", "o", "-")]
        assert [list(y) for y in (lines[1].get_ydata(), lines[2].get_ydata())] == [
            [p[2] for p in curves[0].val], [p[2] for p in curves[0].exact]]
    assert by_time.get_xlabel() == "training time (s, evaluations excluded)"
    key, named = ([t.get_text() for t in legend.get_texts()] for legend in fig.legends)
    assert key == ["train (mean over each log interval)",
                   "validation, estimate (first --eval-tokens of the split)",
                   "validation, exact (whole split, as eval perplexity)"]
    assert named == [c.label for c in curves]
    linear = plot.figure(curves, log_y=False)
    assert [ax.get_yscale() for ax in linear.axes] == ["linear", "linear"]
    assert len(plot.figure(curves[1:]).legends) == 1  # one run: the title names it


@needs_matplotlib
def test_default_is_the_latest_run(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["runs"]))
    result = invoke()
    out = runs["b"] / "curves.png"
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out} (1 run)\n"
    assert png_size(out) == (WIDTH, HEIGHT)
    assert out.stat().st_size > 20_000  # two panels of axes, curves and text, not a blank image
    assert colour_pixels(out, C0) > 50  # run b's curves, in the first colour
    assert colour_pixels(out, C1) == 0
    assert not [p for p in runs["b"].iterdir() if p.name.endswith(".tmp")]


@needs_matplotlib
def test_two_runs_overlaid(runs, tmp_path):
    out = tmp_path / "compare.png"
    result = invoke(str(runs["a"]), str(runs["b"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out} (2 runs)\n"
    assert png_size(out) == (WIDTH, HEIGHT)
    assert out.stat().st_size > 20_000
    assert colour_pixels(out, C0) > 50 and colour_pixels(out, C1) > 50  # both runs drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png"]


@needs_matplotlib
def test_several_runs_default_to_curves_png_here(runs, tmp_path):
    result = invoke(str(runs["a"]), str(runs["b"] / "metrics.jsonl"))
    assert result.exit_code == 0, result.output
    assert result.stdout == "wrote curves.png (2 runs)\n"
    assert png_size(tmp_path / "curves.png") == (WIDTH, HEIGHT)


@needs_matplotlib
def test_same_directory_names_are_told_apart(runs, tmp_path):
    other = tmp_path / "elsewhere" / "a"
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_bytes((runs["a"] / "metrics.jsonl").read_bytes())
    assert plot._names([runs["a"], other]) == [f"{runs['a'].parent.name}/a", "elsewhere/a"]
    result = invoke(str(runs["a"]), str(other), "--out", str(tmp_path / "same.png"))
    assert result.exit_code == 0, result.output


def test_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = invoke(str(runs["a"]), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert result.stderr == "charlm: error: charlm plot needs matplotlib: pip install 'charlm-rnn[plot]'\n"
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_no_runs_yet(tmp_path):
    result = invoke()
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: no runs yet in {tmp_path / 'no-runs'}/: train one first with "
        "`charlm train`, or pass RUN_DIR\n"
    )


def test_latest_pointing_at_a_deleted_run_names_it_and_the_newest_run(runs, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "runs"
    for name in ("a", "b"):  # b was written last; copies keep the times
        shutil.copytree(runs[name], root / name)
    (root / "latest").write_text(str(tmp_path / "gone") + "\n", encoding="utf-8")
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(root))
    newest = root / "b"
    line = (f"charlm: error: {root / 'latest'} names {tmp_path / 'gone'}, which no longer exists; "
            f"the newest run in {root}/ is {newest}: pass RUN_DIR\n")
    result = invoke()
    assert (result.exit_code, result.stderr) == (1, line)
    result = invoke(str(root / "latest"))  # the pointer named as the run to plot
    assert (result.exit_code, result.stderr) == (1, line)


def test_directory_without_metrics(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(str(empty))
    assert result.exit_code == 1
    assert result.stderr == f"charlm: error: {empty} has no metrics.jsonl; is it a charlm run directory?\n"


def test_missing_directory_and_plain_file(tmp_path):
    result = invoke(str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.stderr == f"charlm: error: run directory {tmp_path / 'nope'} does not exist\n"
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    result = invoke(str(tmp_path / "notes.txt"))
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: {tmp_path / 'notes.txt'} is not a run directory "
        "(give the directory that holds metrics.jsonl)\n"
    )


def test_metrics_without_curve_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"kind": "summary", "step": 0, "stopped_by": "max_steps 0"}
    (run / "metrics.jsonl").write_text(json.dumps(summary) + '\n{"kind": "tra', encoding="utf-8")
    result = invoke(str(run))
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: {run / 'metrics.jsonl'} holds no train or validation rows yet; let the "
        "run log at least once (every --log-every steps)\n"
    )


@needs_matplotlib
def test_damaged_rows_are_skipped_with_one_warning(runs, tmp_path):
    """Rows that are not JSON, not a row, or whose step, time or perplexity is not a number are
    skipped with one warning; the last line of a live run, not yet complete, quietly."""
    run = tmp_path / "damaged"
    run.mkdir()
    good = (runs["a"] / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damaged = [b"not json\n", b"[1, 2]\n", b'{"kind": "train", "step": "x", "ppl": 3}\n',
               b'{"kind": "val", "step": 5, "time": 1, "ppl": "NaN"}\n', b"\xff\xfe\n",
               b'{"kind": "train", "step": 3, "time": 1, "ppl": 1e400}\n', b"42\n"]
    mixed = [line for pair in zip(good, damaged + [b""] * len(good)) for line in pair]
    (run / "metrics.jsonl").write_bytes(b"".join(mixed) + b'{"kind": "tra')
    result = invoke(str(run))
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"charlm: warning: skipped 7 damaged rows of "
                             f"{run / 'metrics.jsonl'}\n")
    assert png_size(run / "curves.png") == (WIDTH, HEIGHT)
    want, got = plot.read_curves(runs["a"], "a"), plot.read_curves(run, "a")
    assert (got.train, got.val) == (want.train, want.val) and want.train and want.val


def test_out_must_be_png_in_an_existing_directory(runs, tmp_path):
    result = invoke(str(runs["a"]), "--out", "curves.jpg")
    assert result.exit_code == 2
    assert result.stderr == "charlm: error: --out must name a .png file, got curves.jpg\n"
    if HAVE_MATPLOTLIB:
        missing = tmp_path / "no" / "such" / "dir.png"
        result = invoke(str(runs["a"]), "--out", str(missing))
        assert result.exit_code == 1
        assert result.stderr == (
            f"charlm: error: cannot write {missing}: directory {missing.parent} does not exist\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_does_not_import_matplotlib():
    code = "import sys, charlm.cli.app; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"
