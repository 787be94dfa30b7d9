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

from charlm.artifacts.checkpoint import load_checkpoint
from charlm.cli.app import app
from charlm.config.train import TrainConfig
from charlm.config.build import build_config
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from charlm.model.state import detach_state
from charlm.training.trainer import Trainer
from helpers import pydoc_text

REPO = Path(__file__).resolve().parents[2]


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
    assert summary["best_val_ppl_estimate"] == pytest.approx(
        math.exp(summary["best_val_loss_estimate"]))
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))


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


def test_tokens_per_s_leaves_out_the_pauses_between_log_points(small_text, tmp_path, monkeypatch):
    """On a fake clock a step takes 1 s, an evaluation 100 s and a save 50 s: every log row says
    one step's tokens per second and counts only the steps' time, whatever paused in between."""
    import types

    from charlm.training import state, trainer as trainer_module

    clock = [1000.0]
    fake = types.SimpleNamespace(perf_counter=lambda: clock[0])
    monkeypatch.setattr(trainer_module, "time", fake)
    monkeypatch.setattr(state, "time", fake)
    trainer = Trainer(tiny(small_text, tmp_path / "run", max_steps=16, log_every=4, eval_every=5,
                           checkpoint_every=3))

    def taking(seconds: float, method):
        def timed(*args, **kwargs):
            done = method(*args, **kwargs)
            clock[0] += seconds
            return done
        return timed

    trainer.train_step = taking(1.0, trainer.train_step)
    trainer.evaluate = taking(100.0, trainer.evaluate)
    trainer.save = taking(50.0, trainer.save)
    trainer.run()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [(r["step"], r["time"]) for r in train] == [(4, 4.0), (8, 8.0), (12, 12.0), (16, 16.0)]
    assert [r["tokens_per_s"] for r in train] == [4 * 16 / 1.0] * 4  # batch 4 x 16 per second


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


def test_a_run_resumed_after_a_crash_draws_each_sample_once(small_text, tmp_path):
    """Evaluations at steps 2, 4, 6 and 8 wrote samples, the last checkpoint is step 5's, then
    the process died: the resumed run cuts samples.txt back to step 5, as it does metrics.jsonl,
    and ends with the samples of an uninterrupted run."""
    from charlm.training.state import resolve_resume

    over = dict(max_steps=10, eval_every=2, checkpoint_every=5)
    Trainer(tiny(small_text, tmp_path / "full", **over)).run()
    crashing = Trainer(tiny(small_text, tmp_path / "part", **over))

    def crash(trainer):
        if trainer.loop.step == 9:
            raise RuntimeError("the process died")

    crashing.step_hook = crash
    with pytest.raises(RuntimeError, match="the process died"):
        crashing.run()
    again, resumed = resolve_resume({}, str(tmp_path / "part"))
    Trainer(again, resume=resumed).run()
    part = (tmp_path / "part" / "samples.txt").read_text()
    assert part == (tmp_path / "full" / "samples.txt").read_text()
    assert [line for line in part.splitlines() if line.startswith("--- step ")] == [
        f"--- step {step}" for step in (2, 4, 6, 8, 10)]


def test_samples_past_a_step_are_cut_and_the_rest_kept_byte_for_byte(tmp_path):
    from charlm.artifacts.rundir import cut_samples

    path = tmp_path / "samples.txt"
    cut_samples(path, 10)
    assert not path.exists()
    path.write_bytes(b"--- step 5\nab\n\n--- step 10\nx--- step 99\n\xff\n--- step 15\nz\n")
    cut_samples(path, 10)
    assert path.read_bytes() == b"--- step 5\nab\n\n--- step 10\nx--- step 99\n\xff\n"
    cut_samples(path, -1)
    assert path.read_bytes() == b""


def test_pythons_generator_continues_after_a_resume_as_in_an_uninterrupted_run(small_text,
                                                                               tmp_path):
    import random

    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Interrupted

    def drawing(stop_at: int = -1):  # a part of the run that draws from Python's generator
        def hook(trainer):
            random.random()
            if trainer.loop.step == stop_at:
                trainer.stop_signal.append("SIGINT")
        return hook

    full = Trainer(tiny(small_text, tmp_path / "full", max_steps=10))
    full.step_hook = drawing()
    full.run()
    want = random.random()
    part = Trainer(tiny(small_text, tmp_path / "part", max_steps=10))
    part.step_hook = drawing(5)
    with pytest.raises(Interrupted):
        part.run()
    assert load_checkpoint(tmp_path / "part" / "last.pt")["rng"]["python"] != list(
        random.Random(0).getstate()[1])
    again, resumed = resolve_resume({}, str(tmp_path / "part"))
    rest = Trainer(again, resume=resumed)
    rest.step_hook = drawing()
    rest.run()
    assert random.random() == want


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


def test_the_trainers_samples_never_show_unk(small_text, tmp_path):
    trainer = Trainer(tiny(small_text, tmp_path / "run", sample_length=50))
    with torch.no_grad():
        trainer.model.head.bias[0] = 100.0  # <unk> the likeliest next token, whatever came before
    sample = trainer.sample_text()
    assert "<unk>" not in sample and len(sample) == len(trainer.data.sample_prefix(None)) + 50


def test_non_finite_loss_stops_with_the_last_good_checkpoint(small_text, tmp_path):
    cfg = tiny(small_text, tmp_path / "run", max_steps=200, checkpoint_every=10, log_every=10,
               optimizer="sgd", lr=1e6, clip=0.0, dropout=0.0)
    from charlm.errors import CharlmError

    trainer = Trainer(cfg)
    with pytest.raises(CharlmError, match=r"^(loss became (nan|inf)|the weights diverged) by "
                       r"step \d+( \([^)]*\))?; training stopped"):
        trainer.run()


def _cli_args(small_text: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--text", str(small_text), "--hidden", "16", "--layers", "1", "--embed", "8",
            "--batch-size", "4", "--num-steps", "8", "--max-steps", "12", "--time-budget", "0",
            "--eval-every", "6", "--checkpoint-every", "6", "--log-every", "3",
            "--out", str(out), *extra]


def test_cli_train_writes_a_complete_run_directory(small_text, tmp_path, isolated_runs):
    result = CliRunner().invoke(app, _cli_args(small_text, tmp_path / "run", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["steps"] == 12 and summary["run_dir"] == str(tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.jsonl", "last.pt", "best.pt", "samples.txt"} <= names
    assert (isolated_runs / "latest").read_text().strip() == str((tmp_path / "run").resolve())
    from charlm.config.file import load_config_file

    saved = load_config_file(tmp_path / "run" / "config.toml")
    assert saved["hidden"] == 16 and saved["max_steps"] == 12


@pytest.mark.slow
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
    (["--cell", "transformer"], "--cell must be one of rnn, gru, lstm, mingru, minlstm; got 'transformer'"),
    (["--hidden", "-3"], "--hidden must be an integer in [1, 16777216], got -3"),
    (["--dropout", "1.0"], "--dropout must be in [0, 1), got 1.0"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--optimizer", "lbfgs"], "--optimizer must be one of sgd, adam, adamw; got 'lbfgs'"),
    (["--time-budget", "soon"], "--time-budget must look like 90s, 5m, 1.5h or 1h30m; got 'soon'"),
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


def test_resume_takes_the_same_options_as_the_run_recorded_them(small_text, tmp_path, monkeypatch):
    """The run recorded --text absolute and choices in lower case: the same text by a relative
    path, and a choice in another case, are the same options; another text is still refused."""
    run = tmp_path / "run"
    assert CliRunner().invoke(app, _cli_args(small_text, run)).exit_code == 0
    monkeypatch.chdir(small_text.parent)
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--text", small_text.name,
                                      "--cell", "GRU", "--sampling", "Sequential", "--max-steps",
                                      "14", "-q"])
    assert (result.exit_code, result.stderr) == (0, "")
    assert load_checkpoint(run / "last.pt")["step"] == 14
    (small_text.parent / "other.txt").write_text(small_text.read_text())
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--text", "other.txt"])
    assert (result.exit_code, result.stderr) == (2, (
        f"charlm: error: --text ['{small_text.parent.resolve() / 'other.txt'}'] disagrees with "
        f"the checkpoint (['{small_text.resolve()}']) being resumed; drop the option or start a "
        "new run\n"))


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
def test_scratch_and_reset_before_train_end_to_end(small_text, tmp_path, isolated_runs, extra, impl, reset):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, _cli_args(small_text, run, "--cell", "gru", *extra, "--json"))
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["model_config"]["impl"], ckpt["model_config"]["gru_reset"]) == (impl, reset)
    assert ckpt["step"] == 12
    evaluated = CliRunner().invoke(app, ["eval", "perplexity", "--checkpoint", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["impl"] == impl


def test_a_runs_config_toml_reruns_the_same_run(tmp_path, isolated_runs):
    """`charlm train --config RUN/config.toml` trains the same run again: no `out` (the old run
    directory would be refused as busy), the corpus that was actually used (here the python-docs
    fallback for an unreachable default), and any sample prefix, control characters included."""
    hostile = "a\rb\x1b[31mc\x7fd\"e'f\\g"
    args = ["--hidden", "8", "--layers", "1", "--embed", "4", "--batch-size", "4",
            "--num-steps", "8", "--max-steps", "3", "--eval-every", "3", "--sample-length", "5",
            "--impl", "fused", "--max-tokens", "5000", "--sample-prefix", hostile, "-q"]
    first = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "first"), "--json"])
    assert first.exit_code == 0, first.output
    assert "python-docs corpus is used instead" in first.stderr
    from charlm.config.file import load_config_file

    saved = load_config_file(tmp_path / "first" / "config.toml")
    assert "out" not in saved
    assert (saved["corpus"], saved["preprocessing"], saved["sample_prefix"]) == (
        "python-docs", "raw", hostile)
    again = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "first" / "config.toml"),
                                     "-q", "--json"])
    assert again.exit_code == 0, again.output
    second = Path(json.loads(again.stdout)["run_dir"])
    assert second.parent == isolated_runs and second != tmp_path / "first"
    a, b = load_checkpoint(tmp_path / "first" / "last.pt"), load_checkpoint(second / "last.pt")
    assert a["corpus"] == b["corpus"] and a["corpus"]["name"] == "python-docs"
    assert {**a["train_config"], "out": None} == {**b["train_config"], "out": None}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (second / "config.toml").read_text() == (tmp_path / "first" / "config.toml").read_text()


def test_resuming_a_run_that_reached_its_limit_says_which_and_how_to_raise_it(small_text,
                                                                             tmp_path):
    run = tmp_path / "run [1]"
    assert CliRunner().invoke(app, _cli_args(small_text, run)).exit_code == 0
    before = {name: (run / name).read_bytes() for name in ("config.toml", "metrics.jsonl")}
    result = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert (result.exit_code, result.stderr) == (2, (
        "charlm: error: the run already reached max_steps 12 (at step 12); to train on, raise "
        f"it: charlm train --resume '{run}' --max-steps 24\n"))
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("limits, reached, raised", [
    (dict(max_steps=10, epochs=0, time_budget=0.0, budget_text="0"), (10, 0.5, 1.0),
     "max_steps 10 (at step 10); to train on, raise it: RESUME --max-steps 20"),
    (dict(max_steps=0, epochs=2, time_budget=0.0, budget_text="0"), (50, 2.0, 9.0),
     "epochs 2 (at step 50); to train on, raise it: RESUME --epochs 4"),
    (dict(max_steps=0, epochs=0, time_budget=120.0, budget_text="2m"), (70, 0.2, 120.4),
     "time_budget 2m (at step 70); to train on, raise it: RESUME --time-budget 4m"),
    (dict(max_steps=0, epochs=0, time_budget=45.0, budget_text="45"), (7, 0.2, 45.0),
     "time_budget 45 (at step 7); to train on, raise it: RESUME --time-budget 90s"),
])
def test_the_limit_a_run_reached_is_raised_by_doubling_it(limits, reached, raised):
    from charlm.errors import UsageError
    from charlm.training.limits import Limits

    with pytest.raises(UsageError) as err:
        Limits(**limits).check_not_reached(*reached, "RESUME")
    assert str(err.value) == f"the run already reached {raised}"
    Limits(**limits).check_not_reached(reached[0] - 1 if limits["max_steps"] else 0, 0.0, 0.0,
                                       "RESUME")  # not reached: nothing to say


def test_limits_named_on_resume_replace_the_runs_limits(small_text, tmp_path):
    """As for a new run, limits go as a group: `--resume --epochs 1` trains to the end of the
    first epoch, however many steps the run was first given."""
    run = tmp_path / "run"
    args = _cli_args(small_text, run, "--max-tokens", "400")  # 11 batches of 4x8 per epoch
    args[args.index("--max-steps") + 1] = "6"
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["stopped_by"], summary["steps"]) == ("epochs 1", 11)
