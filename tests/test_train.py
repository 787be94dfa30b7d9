"""The trainer, end to end: it learns, logs, checkpoints, resumes bit-exactly, and says no clearly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from charlm.training.checkpoint import load_checkpoint
from charlm.cli.app import app
from charlm.training.config import TrainConfig, build_config
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM, detach_state
from charlm.training.trainer import Trainer
from helpers import pydoc_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """About 30K characters of English prose and code from the stdlib's own docs (offline)."""
    return pydoc_text(tmp_path_factory.mktemp("corpus") / "small.txt", 30_000)


def tiny(small_text: Path, out: Path, **over) -> TrainConfig:
    values = dict(text=[str(small_text)], hidden=24, layers=2, embed=8, dropout=0.1, batch_size=4,
                  num_steps=16, max_steps=30, time_budget="0", log_every=5, eval_every=10,
                  checkpoint_every=10, sample_length=20, impl="fused", out=str(out))
    values.update(over)
    return build_config({}, values)


def test_tiny_model_loss_falls(small_text, tmp_path):
    cfg = tiny(small_text, tmp_path / "run", max_steps=60, dropout=0.0, lr=0.01, log_every=10)
    summary = Trainer(cfg).run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    for r in train:  # perplexity is exp of the mean cross-entropy logged beside it
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    assert summary["steps"] == 60 and summary["stopped_by"] == "max_steps 60"
    assert summary["best_val_ppl"] == pytest.approx(math.exp(summary["best_val_loss"]))


def test_perplexity_is_exp_of_mean_cross_entropy(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run"))
    val = trainer.data.val
    model = trainer.model.eval()
    with torch.no_grad():  # one long window: the plain definition
        logits, _ = model(val[:-1].long()[None])
        expected = F.cross_entropy(logits[0].double(), val[1:].long()).item()
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-5)


def test_state_is_detached_between_sequential_batches(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", dropout=0.0))
    batches = iter(trainer.batches)
    X, Y = next(batches)
    _, state = trainer.train_step(X, Y, None)
    assert state.grad_fn is not None  # the raw state still hangs on this window's graph
    carried = detach_state(state)
    assert carried.grad_fn is None and torch.equal(carried, state)
    X2, Y2 = next(batches)
    loss, _ = trainer.train_step(X2, Y2, carried)
    # backward through the second window reaches no node of the first: no graph growth
    seen, stack = set(), [loss.grad_fn]
    first_nodes = set()
    node_stack = [state.grad_fn]
    while node_stack:
        n = node_stack.pop()
        if n is None or n in first_nodes:
            continue
        first_nodes.add(n)
        node_stack.extend(f for f, _ in n.next_functions)
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        assert n not in first_nodes
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)


def test_clipping_caps_the_global_norm(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", clip=0.05, dropout=0.0, optimizer="sgd",
                           lr=1e-9))
    X, Y = next(iter(trainer.batches))
    trainer.train_step(X, Y, None)
    norm = torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in trainer.model.parameters()]))
    assert norm.item() == pytest.approx(0.05, rel=1e-4)


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def interrupt_at(step: int):
    """A step hook that stops the run the way Ctrl-C does, after `step` steps."""
    def hook(trainer):
        if trainer.loop.step == step:
            trainer.stop_signal.append("SIGINT")
    return hook


def run_interrupted_then_resumed(cfg: TrainConfig, stop_at: int) -> dict:
    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Interrupted

    trainer = Trainer(cfg)
    trainer.step_hook = interrupt_at(stop_at)
    with pytest.raises(Interrupted) as info:
        trainer.run()
    assert info.value.checkpoint == Path(cfg.out) / "last.pt"
    assert load_checkpoint(info.value.checkpoint)["step"] == stop_at
    again, resumed = resolve_resume({}, cfg.out)
    return Trainer(again, resume=resumed).run()


@pytest.mark.parametrize("sampling, stop_at", [("sequential", 13), ("random", 21)])
def test_interrupted_and_resumed_run_ends_bit_identical(small_text, tmp_path, sampling, stop_at):
    over = dict(sampling=sampling, max_steps=37, warmup_steps=5)  # cosine decay in play
    Trainer(tiny(small_text, tmp_path / "full", **over)).run()
    summary = run_interrupted_then_resumed(tiny(small_text, tmp_path / "part", **over), stop_at)
    assert summary["steps"] == 37
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_right_after_an_epoch_is_exact(small_text, tmp_path):
    over = dict(max_tokens=1500, warmup_steps=2, max_steps=30)
    per_epoch = len(Trainer(tiny(small_text, tmp_path / "probe", **over)).batches)
    assert per_epoch < 25
    Trainer(tiny(small_text, tmp_path / "full", **over)).run()
    run_interrupted_then_resumed(tiny(small_text, tmp_path / "part", **over), per_epoch)
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_rebuilds_its_own_model(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", max_steps=10))
    trainer.run()
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["format"] == "charlm-checkpoint" and ckpt["version"] == 1
    model = CharLM(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    X = trainer.data.val[:20].long()[None]
    model.eval(), trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(X)[0], trainer.model(X)[0])
    assert ckpt["vocab"]["tokens"] == trainer.data.vocab.tokens
    assert ckpt["iterator"]["position"] == trainer.batches.position
    assert set(ckpt["rng"]) >= {"torch", "python"}


def test_non_finite_loss_stops_with_the_last_good_checkpoint(small_text, tmp_path):
    cfg = tiny(small_text, tmp_path / "run", max_steps=200, checkpoint_every=10, log_every=10,
               optimizer="sgd", lr=1e6, clip=0.0, dropout=0.0)
    from charlm.errors import CharlmError

    trainer = Trainer(cfg)
    with pytest.raises(CharlmError, match=r"^loss became (nan|inf) by step \d+; training stopped"):
        trainer.run()


def _cli_args(small_text: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--text", str(small_text), "--hidden", "16", "--layers", "1", "--embed", "8",
            "--batch-size", "4", "--num-steps", "8", "--max-steps", "12", "--time-budget", "0",
            "--eval-every", "6", "--checkpoint-every", "6", "--log-every", "3",
            "--out", str(out), *extra]


def test_cli_train_writes_a_complete_run_directory(small_text, tmp_path, runs_dir):
    result = CliRunner().invoke(app, _cli_args(small_text, tmp_path / "run", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["steps"] == 12 and summary["run_dir"] == str(tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.jsonl", "last.pt", "best.pt", "samples.txt"} <= names
    assert (runs_dir / "latest").read_text().strip() == str((tmp_path / "run").resolve())
    from charlm.training.config import load_config_file

    saved = load_config_file(tmp_path / "run" / "config.toml")
    assert saved["hidden"] == 16 and saved["max_steps"] == 12


def test_cli_train_as_a_subprocess(small_text, tmp_path):
    env = {**os.environ, "CHARLM_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", "charlm", *_cli_args(small_text, tmp_path / "run"),
                           "--cell", "lstm"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "summary" in proc.stdout and "best val ppl" in proc.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pt")["model_config"]["cell"] == "lstm"


def test_cli_resume_continues_to_the_new_limit(small_text, tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(app, _cli_args(small_text, run)).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "18", "--json"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt")["step"] == 18


@pytest.mark.parametrize("args, message", [
    (["--bidirectional"], "--bidirectional is not supported: a bidirectional layer reads the "
                          "characters it is asked to predict, so it cannot be a language model"),
    (["--cell", "transformer"], "cell must be one of rnn, gru, lstm; got 'transformer'"),
    (["--hidden", "-3"], "hidden must be an integer in [1, 16777216], got -3"),
    (["--dropout", "1.0"], "dropout must be in [0, 1), got 1.0"),
    (["--lr", "0"], "lr must be a positive number, got 0.0"),
    (["--optimizer", "lbfgs"], "optimizer must be one of sgd, adam, adamw; got 'lbfgs'"),
    (["--time-budget", "soon"], "time_budget must look like 90s, 5m, 1.5h or 1h30m; got 'soon'"),
])
def test_bad_options_give_one_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    assert result.stderr == f"charlm: error: {message}\n"
    assert not (tmp_path / "r").exists()


def test_resume_with_a_different_model_option_is_refused(small_text, tmp_path):
    run = tmp_path / "run"
    assert CliRunner().invoke(app, _cli_args(small_text, run)).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--hidden", "32"])
    assert result.exit_code == 2
    assert result.stderr == ("charlm: error: --hidden 32 disagrees with the checkpoint (16) being "
                             "resumed; drop the option or start a new run\n")


def test_resume_with_no_runs_says_how_to_name_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "none"))
    result = CliRunner().invoke(app, ["train", "--resume"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"charlm: error: no runs yet in {tmp_path / 'none'}/: train one first with `charlm train`, "
        "or name one: charlm train --resume RUN_DIR|CHECKPOINT\n")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("extra, impl, reset", [
    (["--impl", "scratch"], "scratch", "after"),
    (["--gru-reset", "before"], "scratch", "before"),  # auto picks the one implementation that has it
])
def test_scratch_and_reset_before_train_end_to_end(small_text, tmp_path, runs_dir, extra, impl, reset):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, _cli_args(small_text, run, "--cell", "gru", *extra, "--json"))
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["model_config"]["impl"], ckpt["model_config"]["gru_reset"]) == (impl, reset)
    assert ckpt["step"] == 12
    evaluated = CliRunner().invoke(app, ["eval", "perplexity", "--checkpoint", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["impl"] == impl
