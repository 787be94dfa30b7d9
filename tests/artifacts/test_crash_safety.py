"""Crashes mid-run: SIGKILL at random moments, SIGINT/SIGTERM, and a full disk while saving.

What must hold: every checkpoint on disk always loads; a killed writer leaves at most a hidden
temp file, which the next trainer on the run deletes; `charlm train --resume RUN` continues and
ends bit-identical to a run never interrupted (CPU, one thread, same seed); a failed save leaves
the previous checkpoint byte for byte as it was.

The SIGKILL loop is tests/soak.py's (scripts/soak.py runs it long), run short: its `charlm train`
processes are forked from a warm Python with charlm imported (tests/forkserver.py), so each of
the 12 restarts costs ~0.1 s, not 2-4 s of imports. The runs that get SIGINT/SIGTERM are plain `python -m charlm` subprocesses;
the resumed and the reference runs are forked again (all of them on one thread, so their
arithmetic is the same).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
import torch

from charlm.artifacts import rundir
from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint
from charlm.errors import CharlmError

import soak
from forkserver import ForkServer
from soak import SEED, python_m_charlm, wait_for_rows

REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return soak.write_corpus(tmp_path_factory.mktemp("corpus") / "small.txt")


# --- SIGKILL ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(corpus, tmp_path):
    max_steps, kills = 200, 12  # at most ~12 x 11 steps go by in the kill loop
    run, reference = tmp_path / "killed", tmp_path / "uninterrupted"
    server = ForkServer(tmp_path, soak.env_for(tmp_path / "runs"))
    try:
        uninterrupted = server.start(soak.train_args(corpus, reference, max_steps, SEED))
        lines: list[str] = []
        done = soak.kill_loop(server, corpus, run, kills=kills, max_steps=max_steps, seed=SEED,
                              rng=random.Random(SEED), max_gap=10, max_jitter=0.04,
                              report=lines.append)
        resumed = server.start(["train", "--resume", str(run), "-q"])
        assert resumed.wait() == 0, resumed.communicate()[1]
        assert uninterrupted.wait() == 0, uninterrupted.communicate()[1]
    finally:
        server.close()
    assert len(done) == kills and len(lines) == kills
    for kill in done:  # after each kill: every checkpoint loaded; no temp file but the victim's
        assert kill.check.problems == [], lines
        assert set(kill.check.steps) <= {"last.pt", "best.pt"}
    steps = [k.check.steps.get("last.pt", 0) for k in done]
    assert steps == sorted(steps) and 0 < steps[-1] < max_steps, lines
    assert sum(k.resumed for k in done) >= kills // 2, lines  # resumed, again and again
    end = soak.check_run_dir(run)
    assert end.problems == [] and end.temps == []  # the last resume swept the victims' temp files
    assert end.steps["last.pt"] == max_steps
    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key in ("step", "tokens_seen", "iterator"):
        assert a[key] == b[key], key


# --- SIGINT, SIGTERM ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork-server")
    server = ForkServer(root, soak.env_for(root / "runs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def uninterrupted_60(corpus, fork_server, tmp_path_factory) -> Path:
    """The 60-step run the interrupted ones must end equal to."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, err = soak.run_to_end(fork_server, soak.train_args(corpus, run, 60, SEED))
    assert code == 0, err
    return run / "last.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exits_130_and_the_resumed_run_ends_bit_identical(
        sig, corpus, fork_server, uninterrupted_60, tmp_path):
    run = tmp_path / "run"
    proc = python_m_charlm(soak.train_args(corpus, run, 60, SEED), soak.env_for(tmp_path / "runs"))
    wait_for_rows(proc, run)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpt = load_checkpoint(run / "last.pt")
    step = ckpt["step"]
    assert 0 < step < 60
    assert soak.metrics_steps(run)[-1] == step  # saved at the last completed step, no later
    assert err == (f"charlm: {sig.name}: saved {run / 'last.pt'} at step {step}; resume with: "
                   f"charlm train --resume {run}\n")
    assert out == ""
    assert soak.check_run_dir(run).temps == []
    code, err = soak.run_to_end(fork_server, ["train", "--resume", str(run), "-q"])
    assert code == 0, err
    a, b = load_checkpoint(uninterrupted_60)["model"], load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_sigterm_before_training_stops_with_one_line_and_130(corpus, tmp_path, monkeypatch,
                                                            capsys):
    from charlm.data import dataset as dataset_module
    from charlm.cli.app import main

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    real_locate = dataset_module.locate_corpus

    def locate_corpus(*args, **kwargs):  # SIGTERM arrives while the corpus is read, before any step
        os.kill(os.getpid(), signal.SIGTERM)
        return real_locate(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "locate_corpus", locate_corpus)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        main(soak.train_args(corpus, tmp_path / "run", 10, SEED))
    assert info.value.code == 130
    assert capsys.readouterr().err == "charlm: error: interrupted\n"
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # main() put the old handler back


# --- a failing disk -----------------------------------------------------------------------------


def payload(value: float) -> dict:
    return {"model_config": {"vocab_size": 3}, "vocab": {"tokens": ["<unk>", "a", "b"]},
            "model": {"w": torch.full((64, 64), value)}, "step": int(value)}


def half_then(error: BaseException, real_save=torch.save):
    """A torch.save that writes half of the file, then fails as a full disk does."""
    def save(obj, fh):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error
    return save


@pytest.mark.parametrize("failure", ["torch.save ENOSPC", "fsync EIO", "replace EACCES",
                                     "Ctrl-C mid-write"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(failure, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(payload(1.0), path)
    before = path.read_bytes()
    real_fsync = os.fsync
    if failure == "torch.save ENOSPC":
        expected = os.strerror(errno.ENOSPC)
        monkeypatch.setattr(torch, "save", half_then(OSError(errno.ENOSPC, expected)))
    elif failure == "fsync EIO":
        def fsync(fd):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                return real_fsync(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "fsync", fsync)
        expected = os.strerror(errno.EIO)
    elif failure == "replace EACCES":
        def replace(src, dst):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        monkeypatch.setattr(os, "replace", replace)
        expected = os.strerror(errno.EACCES)
    else:
        monkeypatch.setattr(torch, "save", half_then(KeyboardInterrupt()))
        expected = None
    if expected is None:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(payload(2.0), path)
    else:
        with pytest.raises(CharlmError) as info:
            save_checkpoint(payload(2.0), path)
        assert str(info.value) == (f"cannot write {path}: {expected}; the previous last.pt, if "
                                   "any, is intact")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_a_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CharlmError, match="No space left on device"):
        save_checkpoint(payload(1.0), tmp_path / "best.pt")
    assert os.listdir(tmp_path) == []


def test_full_disk_mid_training_is_one_line_and_keeps_the_last_good_checkpoint(
        corpus, tmp_path, monkeypatch, capsys):
    from charlm.cli.app import main

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    calls = []
    real_save = torch.save

    def save(obj, fh):  # the third save (last.pt at step 6) finds the disk full
        calls.append(obj["step"])
        if len(calls) == 3:
            return half_then(OSError(errno.ENOSPC, "No space left on device"))(obj, fh)
        return real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(soak.train_args(corpus, run, 40, SEED))
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"charlm: error: cannot write {run / 'last.pt'}: No space left on device; the previous "
        "last.pt, if any, is intact\n")
    assert calls == [2, 4, 6]
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert soak.check_run_dir(run).temps == []
    with rundir.RunLock(run):  # the failed trainer let go of the run
        pass


# --- temp files and modes -----------------------------------------------------------------------


def test_taking_the_lock_sweeps_dead_writers_temp_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".last.pt.{dead}.0123abcd.tmp"
    live = tmp_path / f".best.pt.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / ".notes.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"half a checkpoint")
    with rundir.RunLock(tmp_path):
        assert not stale.exists()
        assert live.exists() and other.exists()  # a live writer's, and not ours


def test_atomic_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(payload(1.0), tmp_path / "last.pt")
        rundir.write_text_atomic(tmp_path / "config.toml", "seed = 1\n")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"last.pt": 0o644, "config.toml": 0o644, "plain.txt": 0o644}


def test_resume_from_another_directory(corpus, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from charlm.cli.app import app

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "small.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "a")
    args = soak.train_args(Path("small.txt"), tmp_path / "run", 4, SEED)
    assert CliRunner().invoke(app, args).exit_code == 0
    monkeypatch.chdir(tmp_path / "b")
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"),
                                      "--max-steps", "6"])
    assert result.exit_code == 0, result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for this test (root only; skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` up to `leave` free bytes."""
    (disk / "filler").unlink(missing_ok=True)
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_a_real_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(
        corpus, small_disk, monkeypatch):
    """torch.save on a really full disk fails inside its zip writer ("[enforce fail at
    inline_container.cc] unexpected pos"), not with the OSError simulated above."""
    from helpers import run_main

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(small_disk.parent / "runs"))
    run = small_disk / "run"
    assert run_main(soak.train_args(corpus, run, 4, SEED))[0] == 0
    before = (run / "last.pt").read_bytes()
    # room for config.toml and metrics rows, not for a checkpoint (about 105 KB): with 64 KB the
    # zip writer fails mid-file (RuntimeError), with 8 KB the first write fails (OSError)
    for leave in (64 * 1024, 8 * 1024):
        fill(small_disk, leave)
        assert run_main(["train", "--resume", str(run), "--max-steps", "8", "-q"]) == (1, "", (
            f"charlm: error: cannot write {run / 'last.pt'}: No space left on device; the "
            "previous last.pt, if any, is intact\n"))
    assert (run / "last.pt").read_bytes() == before
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert soak.check_run_dir(run).temps == []


def test_a_damaged_metrics_file_does_not_stop_a_resume(corpus, tmp_path, monkeypatch):
    """metrics.jsonl is cut back to the checkpoint's step on resume: bytes that are not UTF-8,
    rows that are not objects, a step that is not a number are dropped, not a crash."""
    from helpers import run_main

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    run = tmp_path / "run"
    assert run_main(soak.train_args(corpus, run, 4, SEED))[0] == 0
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(
        good + b'\xff\xfe garbage\n[1, 2]\n42\n{"kind": "train", "step": "x"}\n')
    assert run_main(["train", "--resume", str(run), "--max-steps", "6", "-q"])[0] == 0
    assert soak.metrics_steps(run) == [1, 2, 3, 4, 5, 6]
    assert b"garbage" not in (run / "metrics.jsonl").read_bytes()
