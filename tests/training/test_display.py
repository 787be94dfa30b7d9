"""What a person reads: the live progress line, plain lines and tables off a terminal (never
wrapped), and every string the user gave printed literally (no rich markup)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from charlm.system.console import console
from charlm.config.build import build_config
from charlm.training.display import TrainDisplay, clock
from charlm.training.limits import Limits
from charlm.training.trainer import Trainer
from helpers import invoke, pydoc_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    return pydoc_text(tmp_path_factory.mktemp("corpus") / "small.txt", 20_000)


def tiny(text: Path, out: Path, **over):
    values = dict(text=[str(text)], hidden=8, layers=1, embed=4, batch_size=4, num_steps=8,
                  max_steps=7, log_every=100, eval_every=100, checkpoint_every=100,
                  sample_length=10, impl="fused", out=str(out))
    return build_config({}, {**values, **over})


def test_the_live_line_moves_every_step_and_ends_on_the_last_one_at_100_percent(small_text,
                                                                               tmp_path):
    """On a terminal: no log point during the run (--log-every 100), yet the line shows every
    step, its share done and an ETA (from the first step: the step limit at the pace so far);
    when the run ends it is drawn once more at its last step, 100%, ETA 0:00:00."""
    out = io.StringIO()
    display = TrainDisplay(console=Console(file=out, force_terminal=True, width=200,
                                           color_system=None))
    trainer = Trainer(tiny(small_text, tmp_path / "run"), display=display)
    seen = []

    def look(t):
        task = t.display.progress.tasks[0]
        seen.append((task.fields["head"], task.completed, task.fields["eta"]))

    trainer.step_hook = look
    trainer.run()
    per_epoch = len(trainer.batches)  # "epochs": epochs done, as in the summary
    assert [head for head, _, _ in seen] == [f"epochs {i / per_epoch:.2f} step {i}"
                                             for i in range(1, 8)]
    assert [done for _, done, _ in seen] == pytest.approx([i / 7 * 1000 for i in range(1, 8)])
    assert all(re.fullmatch(r"\d+:\d\d:\d\d", eta) for _, _, eta in seen)
    assert seen[-1][2] == "0:00:00"
    last = [line for line in re.split(r"[\r\n]", out.getvalue()) if " step " in line][-1]
    assert f"epochs {7 / per_epoch:.2f} step 7" in last and "100%" in last and last.rstrip().endswith("ETA 0:00:00")


def test_off_a_terminal_one_line_per_log_point_and_one_for_the_last_steps(small_text, tmp_path):
    out = io.StringIO()
    trainer = Trainer(tiny(small_text, tmp_path / "run", log_every=3),
                      display=TrainDisplay(console=console(file=out)))
    trainer.run()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("epochs ")]
    per_epoch = len(trainer.batches)
    assert [line.split(" | ")[0] for line in lines] == [
        f"epochs {i / per_epoch:.2f} step {i}" for i in (3, 6, 7)]
    assert lines[-1].endswith(" | 100% | ETA 0:00:00")
    rows = [json.loads(row) for row in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6, 7]


def test_off_a_terminal_only_the_last_line_says_100_percent():
    """A log point at 99.5% printed "100%" and the end's line a second one: shares round down."""
    out = io.StringIO()
    display = TrainDisplay(console=console(file=out))
    row = {"step": 200, "epoch": 0, "loss": 1.0, "ppl": 2.718, "tokens_per_s": 1000.0,
           "lr": 1e-3}
    for progress in (200 / 201, 0.29, 1.0):  # 0.29 * 100 is 28.999999999999996
        display.log(row, progress, 0.0, epochs=0.5)
    assert [line.split(" | ")[3] for line in out.getvalue().splitlines()] == ["99%", "29%",
                                                                              "100%"]


def test_the_summary_labels_its_figures():
    """The summary says which figure is exact and which an estimate, that its tokens/s is the
    run's mean and its epochs the epochs done (a fraction, as the live line counts them)."""
    from charlm.training.display import summary_table

    out = io.StringIO()
    console(file=out).print(summary_table({
        "epochs": 2.931, "val_ppl": 3.5677, "val_checkpoint": "runs/x/best.pt",
        "best_val_ppl_estimate": 3.5943, "mean_tokens_per_s": 61234.5}))
    labels = [line.split("│")[1].strip() for line in out.getvalue().splitlines() if "│" in line]
    assert labels == ["epochs (done)", "val ppl (exact)", "scored checkpoint",
                      "best val ppl (estimate)", "tokens/s (mean over the run)"]


@pytest.mark.parametrize("limits, at, eta", [
    (dict(max_steps=100, epochs=0, time_budget=0.0), (25, 0.1, 10.0), 30.0),  # 75 steps at 0.4 s
    (dict(max_steps=0, epochs=0, time_budget=60.0), (25, 0.1, 15.0), 45.0),  # the budget's rest
    (dict(max_steps=0, epochs=4, time_budget=0.0), (25, 0.5, 10.0), 70.0),  # 3.5 epochs at 20 s
    (dict(max_steps=100, epochs=0, time_budget=60.0), (25, 0.1, 10.0), 30.0),  # the nearer one
    (dict(max_steps=100, epochs=0, time_budget=20.0), (25, 0.1, 10.0), 10.0),
    (dict(max_steps=100, epochs=0, time_budget=5.0), (25, 0.1, 10.0), 0.0),  # past it: 0
    (dict(max_steps=100, epochs=0, time_budget=0.0), (0, 0.0, 0.0), None),  # no pace yet
    (dict(max_steps=0, epochs=0, time_budget=0.0), (25, 0.1, 10.0), None),  # no limit
])
def test_the_eta_comes_from_the_limit_that_stops_the_run(limits, at, eta):
    got = Limits(**limits, budget_text="").eta(*at)
    assert got == (pytest.approx(eta) if eta is not None else None)


def test_clock():
    assert [clock(s) for s in (None, 0, 59.6, 3725, float("inf"))] == [
        "-:--:--", "0:00:00", "0:01:00", "1:02:05", "-:--:--"]


def test_user_strings_print_literally_and_nothing_wraps_off_a_terminal(small_text, tmp_path,
                                                                       monkeypatch):
    """Brackets in a file name or run directory are not rich markup (`notes[v2].txt` showed as
    `notes:`, `--out 'x[/1]'` crashed with a MarkupError), and off a terminal (`| tee log`)
    neither the train summary nor the eval table wraps a path longer than 80 columns."""
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    notes = tmp_path / "notes[v2].txt"
    notes.write_text(small_text.read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / ("a-long-folder-name-that-a-terminal-would-wrap-" * 2) / "exp[/1]"
    result = invoke("train", "--text", str(notes), "--hidden", "8", "--layers", "1",
                    "--batch-size", "4", "--num-steps", "8", "--max-steps", "3", "--log-every", "1",
                    "--impl", "fused", "--out", str(run))
    assert result.exit_code == 0, result.output
    assert "\ncorpus notes[v2]: " in result.stderr
    assert f"\nrun directory: {run}\n" in result.stderr
    assert " step 3 | loss " in result.stderr
    summary = result.stdout.splitlines()
    assert any(f" {run / 'best.pt'} " in line for line in summary), result.stdout
    assert len(max(summary, key=len)) > 120  # one line per row, however wide
    evaluated = invoke("eval", "perplexity", "--checkpoint", str(run), "--text", str(notes))
    assert evaluated.exit_code == 0, evaluated.output
    rows = evaluated.stdout.splitlines()
    assert any(f" {run / 'best.pt'} " in line for line in rows), evaluated.stdout
    assert any(f" {notes} " in line for line in rows)


def test_a_best_loss_past_floats_range_shows_an_infinite_perplexity(tiny_run, tmp_path,
                                                                    monkeypatch):
    """A resumed run whose best validation loss is thousands of nats (weights of magnitude 1e5,
    within what a checkpoint may hold) ends with its summary, perplexity inf, not a crash."""
    import math

    import torch

    run = tmp_path / "run"
    run.mkdir()
    ckpt = torch.load(tiny_run / "run" / "last.pt", weights_only=True)
    head = ckpt["model"]["head.weight"]
    loud = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 1e5
    ckpt["model"]["head.weight"] = loud
    ckpt["best_val_loss"] = math.inf  # no validation yet: the resumed run's own becomes the best
    torch.save(ckpt, run / "last.pt")
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    result = invoke("train", "--resume", str(run), "--max-steps", str(ckpt["step"] + 1), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    best = summary["best_val_loss_estimate"]
    assert best > 1000 and summary["best_val_ppl_estimate"] == math.inf
    assert summary["best_val_bpc_estimate"] == pytest.approx(best / math.log(2))
    assert summary["val_loss"] > 1000 and summary["val_ppl"] == math.inf
