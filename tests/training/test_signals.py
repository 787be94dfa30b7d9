"""Signals at every moment of a run: real `python -m charlm` processes, real signals.

A stop request (SIGINT, SIGTERM, or SIGHUP: the terminal closed) always ends in a saved last.pt
and the command that resumes it, exit 130, wherever it lands: in a step, in a mid-run evaluation
or sample (cut short at once, then done first by the resumed run), in the final evaluation and
sample after the last step. Ranks of `--nproc` stop and save when their launcher is killed, even
by SIGKILL, instead of training on as orphans that hold the run's lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Slow (signals sent to real `charlm train` processes): left out of `pytest -m "not slow"`.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
import torch

from charlm.artifacts import rundir
from charlm.artifacts.checkpoint import load_checkpoint
from charlm.config.build import build_config
from charlm.training import validation
from charlm.training.state import resolve_resume
from charlm.training.trainer import Interrupted, Trainer
from helpers import pydoc_text, run_main
import soak
from forkserver import ForkServer
from soak import SEED, python_m_charlm, wait_for_rows

LONG_SAMPLE = ("--sample-length", "100000000")  # hours of drawing: only a stop request ends it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return soak.write_corpus(tmp_path_factory.mktemp("corpus") / "small.txt")


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def stopped(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The process's output once it has ended; killed (and the test failed) past `timeout`."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running {timeout} s after the stop request")


def resume_hint(run: Path, signame: str, step: int, nproc: str = "") -> str:
    return (f"charlm: {signame}: saved {run / 'last.pt'} at step {step}; resume with: "
            f"charlm train{nproc} --resume {run}\n")


# --- SIGHUP: the terminal closed --------------------------------------------------------------------


def _sighup_default() -> None:
    """In the child before exec: SIGHUP as a terminal leaves it. A suite run under nohup passes
    SIGHUP ignored to every child, and charlm then rightly goes on (the test below)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_sighup_saves_and_says_how_to_resume_like_sigterm(corpus, tmp_path):
    run = tmp_path / "run"
    proc = python_m_charlm(soak.train_args(corpus, run, 100_000, SEED),
                           soak.env_for(tmp_path / "runs"), preexec_fn=_sighup_default)
    wait_for_rows(proc, run)
    proc.send_signal(signal.SIGHUP)
    out, err = stopped(proc)
    step = load_checkpoint(run / "last.pt")["step"]
    assert (proc.returncode, out, err) == (130, "", resume_hint(run, "SIGHUP", step))
    assert soak.metrics_steps(run)[-1] == step


def test_under_nohup_sighup_stays_ignored(corpus, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", *soak.train_args(corpus, run, 40, SEED)],
        env=soak.env_for(tmp_path / "runs"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_rows(proc, run)
    proc.send_signal(signal.SIGHUP)
    out, err = stopped(proc, timeout=180)
    assert (proc.returncode, err) == (0, "")
    assert load_checkpoint(run / "last.pt")["step"] == 40


# --- stops during an evaluation or a sample ---------------------------------------------------------


def test_a_stop_during_the_final_sample_saves_the_run_and_the_resume_finishes_it(corpus, tmp_path):
    run = tmp_path / "run"
    args = [*soak.train_args(corpus, run, 4, SEED), "--eval-every", "1000",
            "--checkpoint-every", "1000", *LONG_SAMPLE]  # nothing saved before the end
    proc = python_m_charlm(args, soak.env_for(tmp_path / "runs"))
    wait_until(lambda: soak.metrics_steps(run)[-1:] == [4], proc, "step 4")
    time.sleep(0.5)  # into the final evaluation and its (endless) sample
    proc.send_signal(signal.SIGTERM)
    out, err = stopped(proc)
    assert (proc.returncode, out, err) == (130, "", resume_hint(run, "SIGTERM", 4))
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 4 and ckpt["eval_pending"] == "periodic"

    os.environ["CHARLM_RUNS_DIR"] = str(tmp_path / "runs")
    try:
        code, _, err = run_main(["train", "--resume", str(run), "--sample-length", "20", "-q"])
    finally:
        del os.environ["CHARLM_RUNS_DIR"]
    assert code == 0, err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 4 and ckpt["eval_pending"] is False
    assert [(r["step"], r["val_kind"]) for r in rundir.read_metrics(run / "metrics.jsonl")
            if r["kind"] == "val"] == [(4, "estimate"), (4, "exact")]
    assert (run / "best.pt").exists()


def test_a_stop_during_a_mid_run_sample_cuts_it_short_and_resumes_exactly(corpus, fork_server,
                                                                          tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    every = ["--eval-every", "3", "--checkpoint-every", "1000"]
    proc = python_m_charlm([*soak.train_args(corpus, run, 100_000, SEED), *every, *LONG_SAMPLE],
                           soak.env_for(tmp_path / "runs"))
    wait_until(lambda: soak.metrics_steps(run)[-1:] == [3], proc, "step 3")
    time.sleep(0.5)  # into the evaluation at step 3 and its (endless) sample
    proc.send_signal(signal.SIGINT)
    out, err = stopped(proc)  # at once, not after the sample
    assert (proc.returncode, out, err) == (130, "", resume_hint(run, "SIGINT", 3))
    assert load_checkpoint(run / "last.pt")["eval_pending"] == "periodic"

    short = ("--sample-length", "20")
    code, err = soak.run_to_end(fork_server, ["train", "--resume", str(run), "--max-steps", "7",
                                              *short, "-q"])
    assert code == 0, err
    code, err = soak.run_to_end(fork_server, [*soak.train_args(corpus, reference, 7, SEED),
                                              *every, *short])
    assert code == 0, err
    rows = [(r["kind"], r["step"]) for r in rundir.read_metrics(run / "metrics.jsonl")]
    assert rows == [(r["kind"], r["step"]) for r in rundir.read_metrics(reference / "metrics.jsonl")]
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["best_val_loss"] == b["best_val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_stop_during_the_final_exact_evaluation_resumes_to_that_one_alone(tmp_path,
                                                                           monkeypatch):
    """The end of the run scores best.pt exactly (all of the split, one stream) after the
    periodic estimate of the last step. A stop there leaves only the exact one to do: the
    resumed run adds no second periodic row, sample or plateau observation."""
    text = pydoc_text(tmp_path / "small.txt", 20_000)
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))

    def config(out: Path):
        return build_config({}, dict(
            text=[str(text)], hidden=16, layers=1, embed=8, batch_size=4, num_steps=8, max_steps=6,
            time_budget="0", log_every=3, eval_every=3, checkpoint_every=3, eval_tokens=200,
            sample_length=10, schedule="plateau", plateau_patience=1, out=str(out)))

    reference, run = tmp_path / "reference", tmp_path / "run"
    Trainer(config(reference)).run()
    trainer = Trainer(config(run))
    exact = validation.exact

    def stopped(*args):  # as a Ctrl-C does there: inside abandonable(), so Abandoned at once
        trainer.requests.on_signal(signal.SIGINT, None)
        return exact(*args)

    with monkeypatch.context() as patched:
        patched.setattr(validation, "exact", stopped)
        with pytest.raises(Interrupted):
            trainer.run()
    assert load_checkpoint(run / "last.pt")["eval_pending"] == "whole"
    again, resumed = resolve_resume({}, str(run))
    Trainer(again, resume=resumed).run()

    def rows(folder: Path) -> list[tuple]:
        return [(r["kind"], r["step"], r.get("val_kind"), r["loss"])
                for r in rundir.read_metrics(folder / "metrics.jsonl") if r["kind"] != "summary"]

    assert rows(run) == rows(reference)
    assert [r[:3] for r in rows(run) if r[0] == "val"] == [
        ("val", 3, "estimate"), ("val", 6, "estimate"), ("val", 6, "exact")]
    assert (run / "samples.txt").read_text() == (reference / "samples.txt").read_text()
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["scheduler"] == b["scheduler"] and a["eval_pending"] is False


def test_an_older_checkpoints_pending_evaluation_is_the_periodic_one():
    from charlm.training.state import LoopState

    counters = {"step": 6, "tokens_seen": 192, "elapsed": 1.0, "best_val_loss": 4.0}
    for saved, pending in [(True, "periodic"), (False, None), ("whole", "whole")]:
        loop = LoopState()
        loop.load_state_dict({**counters, "eval_pending": saved})
        assert loop.eval_pending == pending
        assert loop.state_dict()["eval_pending"] == (pending or False)


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork-server")
    server = ForkServer(root, soak.env_for(root / "runs"))
    yield server
    server.close()


# --- the --nproc launcher killed ----------------------------------------------------------------------


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_ranks_stop_and_save_when_their_launcher_is_killed(sig, corpus, tmp_path):
    run = tmp_path / "run"
    args = [*soak.train_args(corpus, run, 100_000, SEED), "--nproc", "2"]
    proc = python_m_charlm(args, soak.env_for(tmp_path / "runs"), preexec_fn=_sighup_default)
    ranks: set[int] = set()
    try:
        wait_until(lambda: (run / "last.pt").exists(), proc, "checkpoint", timeout=180)
        ranks = children(proc.pid)
        assert len(ranks) == 2
        proc.send_signal(sig)
        deadline = time.monotonic() + 60
        while any(running(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(r) for r in ranks), "the ranks trained on without their launcher"
        _, err = stopped(proc)
    finally:
        for pid in [proc.pid, *ranks]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    step = load_checkpoint(run / "last.pt")["step"]
    assert soak.metrics_steps(run)[-1] == step  # saved at the last step done
    # the ranks heard SIGTERM from the kernel (SIGKILL) or SIGHUP forwarded by the launcher
    signame = "SIGTERM" if sig == signal.SIGKILL else "SIGHUP"
    assert err == resume_hint(run, signame, step, " --nproc 2")
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGHUP)
    with rundir.RunLock(run):  # nobody holds the run any more
        pass
