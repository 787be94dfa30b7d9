"""Crash soak: SIGKILL `charlm train` at random moments, resume it, and check that it ends exactly
where an uninterrupted run with the same seed ends.

After every kill: each checkpoint (*.pt) in the run directory loads; nothing is there but the
run's own files and, at most, the hidden temp file of the process just killed (the next trainer
to take the run's lock deletes it); last.pt never goes back in steps. At the end, the resumed run
must finish and its weights must equal those of the uninterrupted run, tensor for tensor.

    python scripts/soak.py                       # 20 kills of a 1000-step run, ~2 minutes
    python scripts/soak.py --kills 50 --max-steps 3000 --max-gap 50 --seed 7
    python scripts/soak.py --fork                # charlm forked from a warm python (tests/forkserver.py)

Prints one line per kill and a final verdict; exits 1 on any failure. Not run in CI:
tests/artifacts/test_crash_safety.py runs a short version of the same loop with these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from forkserver import ForkServer

RUN_FILES = {"config.toml", "metrics.jsonl", "samples.txt", "last.pt", "best.pt", "run.lock"}
TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # as charlm.system.files.atomic_write names them


def write_corpus(path: Path, chars: int = 30_000) -> Path:
    """English prose and code from the standard library's own docs: offline, always there."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:chars], encoding="utf-8")
    return path


def train_args(text: Path, out: Path, max_steps: int, seed: int) -> list[str]:
    """A tiny model with dropout, saving last.pt every 2 steps and a metrics row every step."""
    return ["train", "--text", str(text), "--out", str(out), "--impl", "fused", "--cell", "gru",
            "--hidden", "16", "--layers", "2", "--embed", "8", "--dropout", "0.1",
            "--batch-size", "4", "--num-steps", "8", "--seed", str(seed),
            "--max-steps", str(max_steps), "--time-budget", "0", "--warmup-steps", "10",
            "--log-every", "1", "--eval-every", "25", "--checkpoint-every", "2",
            "--sample-length", "10", "-q"]


def env_for(runs_root: Path) -> dict:
    """One thread: fast for a tiny model, and the same arithmetic in every process."""
    env = {**os.environ, "CHARLM_RUNS_DIR": str(runs_root), "OMP_NUM_THREADS": "1"}
    env.pop("CHARLM_DEBUG", None)
    return env


class Subprocesses:
    """Each `charlm` a fresh `python -m charlm` (2-4 s of imports before it trains)."""

    def __init__(self, env: dict):
        self.env = env

    def start(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "charlm", *args], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        pass


def run_to_end(launcher, args: list[str]) -> tuple[int, str]:
    """Start `charlm ARGS` and wait for it: (exit code, stderr)."""
    proc = launcher.start(args)
    _, err = proc.communicate()
    return proc.returncode, err


def metrics_steps(run: Path) -> list[int]:
    """Steps of the train rows of metrics.jsonl (a torn last line is skipped)."""
    steps = []
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return steps
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def last_train_step(run: Path) -> int | None:
    """The step of the last train row of metrics.jsonl, read from its tail (None: no row yet)."""
    try:
        with open(run / "metrics.jsonl", "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            tail = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn, or cut by the seek
            continue
        if row.get("kind") == "train":
            return row["step"]
    return None


def wait_until_step(proc, run: Path, since: float, step: int, timeout: float) -> bool:
    """True once this process (it rewrites metrics.jsonl when it starts) has logged `step`;
    False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            fresh = (run / "metrics.jsonl").stat().st_mtime > since
        except FileNotFoundError:
            fresh = False
        if fresh and (last_train_step(run) or 0) >= step:
            return True
        time.sleep(0.002)
    raise TimeoutError(f"{run} did not reach step {step} in {timeout} s")


@dataclass
class RunCheck:
    steps: dict[str, int] = field(default_factory=dict)  # checkpoint name -> its step
    temps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_run_dir(run: Path, killed_pid: int | None = None) -> RunCheck:
    """Every checkpoint loads; only the run's files, and temp files of `killed_pid` alone."""
    from charlm.artifacts.checkpoint import load_checkpoint
    from charlm.errors import CharlmError

    check = RunCheck()
    for path in sorted(run.iterdir()):
        name = path.name
        match = TEMP.match(name)
        if match:
            check.temps.append(name)
            if killed_pid is None or int(match[1]) != killed_pid:
                check.problems.append(f"stale temp file {name} (not the killed process's)")
        elif name not in RUN_FILES:
            check.problems.append(f"unexpected file {name}")
        elif name.endswith(".pt"):
            try:
                check.steps[name] = load_checkpoint(path)["step"]
            except CharlmError as exc:
                check.problems.append(f"{name} does not load: {exc}")
    return check


def weight_differences(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two checkpoints' weights (torch.equal)."""
    import torch

    from charlm.artifacts.checkpoint import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    if wa.keys() != wb.keys():
        return sorted(wa.keys() ^ wb.keys())
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


@dataclass
class Kill:
    number: int
    after: int  # steps logged by the victim before the kill ...
    jitter: float  # ... plus this many seconds
    pid: int
    resumed: bool
    check: RunCheck

    def line(self, total: int) -> str:
        steps = ", ".join(f"{k} step {v}" for k, v in self.check.steps.items())
        steps = steps or "no checkpoint yet"
        verdict = "ok" if not self.check.problems else "FAIL: " + "; ".join(self.check.problems)
        how = "resumed" if self.resumed else "fresh"
        return (f"kill {self.number}/{total}: {how} run killed {self.jitter * 1000:.0f} ms after "
                f"its step {self.after}; {steps}; {len(self.check.temps)} temp file(s) left: "
                f"{verdict}")


def kill_loop(launcher, text: Path, run: Path, *, kills: int, max_steps: int, seed: int,
              rng: random.Random, max_gap: int, max_jitter: float, report=print) -> list[Kill]:
    """Start (or resume) the run and SIGKILL it `kills` times, checking the run dir each time.

    Each victim is killed at a random moment: `max_jitter` seconds at most after it has logged
    a random 1..`max_gap` steps past its checkpoint, so kills land anywhere in a step (in a
    save too) and the run moves on by at most ~`max_gap` steps per kill, however fast it trains.
    """
    done: list[Kill] = []
    last_step = 0
    while len(done) < kills:
        resumed = (run / "last.pt").exists()
        args = (["train", "--resume", str(run), "-q"] if resumed
                else train_args(text, run, max_steps, seed))
        after, jitter = last_step + rng.randint(1, max_gap), rng.uniform(0, max_jitter)
        since = time.time()
        proc = launcher.start(args)
        try:
            if wait_until_step(proc, run, since, after, timeout=120):
                time.sleep(jitter)
            if proc.poll() is not None:  # it finished (or failed) before the kill
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise AssertionError(f"charlm train exited {proc.returncode}: {err.strip()}")
                raise AssertionError(f"the run reached step {max_steps} after {len(done)} kills; "
                                     "use a larger --max-steps")
            proc.kill()
            proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        check = check_run_dir(run, killed_pid=proc.pid)
        step = check.steps.get("last.pt", 0)
        if step < last_step:
            check.problems.append(f"last.pt went back from step {last_step} to {step}")
        last_step = max(last_step, step)
        done.append(Kill(len(done) + 1, after, jitter, proc.pid, resumed, check))
        report(done[-1].line(kills))
    return done


def soak(launcher, work: Path, kills: int, max_steps: int, seed: int, max_gap: int,
         max_jitter: float, report=print) -> list[str]:
    """The whole soak in `work`: the problems found (empty: it passed)."""
    text = write_corpus(work / "corpus.txt")
    reference, run = work / "uninterrupted", work / "killed"
    ref = launcher.start(train_args(text, reference, max_steps, seed))  # runs alongside
    try:
        done = kill_loop(launcher, text, run, kills=kills, max_steps=max_steps, seed=seed,
                         rng=random.Random(seed), max_gap=max_gap, max_jitter=max_jitter,
                         report=report)
    except (AssertionError, TimeoutError) as exc:
        ref.kill()
        ref.wait()
        return [str(exc)]
    code, err = run_to_end(launcher, ["train", "--resume", str(run), "-q"])
    _, ref_err = ref.communicate()
    problems = [f"kill {k.number}: {p}" for k in done for p in k.check.problems]
    if ref.returncode != 0:
        problems.append(f"the uninterrupted run failed: {ref_err.strip()}")
    if code != 0:
        problems.append(f"the final resume failed: {err.strip()}")
        return problems
    end = check_run_dir(run)
    problems += [f"after the final resume: {p}" for p in end.problems]
    if end.temps:
        problems.append(f"temp files left after the final resume: {end.temps}")
    if end.steps.get("last.pt") != max_steps:
        problems.append(f"the resumed run ended at step {end.steps.get('last.pt')}, "
                        f"not {max_steps}")
    if ref.returncode == 0:
        differ = weight_differences(reference / "last.pt", run / "last.pt")
        if differ:
            problems.append(f"weights differ from the uninterrupted run's: {differ[:5]}")
    return problems


# What the tests that start charlm processes share.
SEED = 11


def python_m_charlm(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charlm", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_rows(proc: subprocess.Popen, run: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not metrics_steps(run):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no metrics rows in {run} after {timeout} s"
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the final resume")
    parser.add_argument("--max-steps", type=int, default=1000, help="length of the run")
    parser.add_argument("--max-gap", type=int, default=30,
                        help="kill after a random 1..this steps past the checkpoint resumed from")
    parser.add_argument("--max-jitter", type=float, default=0.05,
                        help="... and a random 0..this seconds more (a step takes ~10-20 ms)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times and the run")
    parser.add_argument("--fork", action="store_true",
                        help="fork each charlm from a warm python instead of a fresh process")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="charlm-soak-") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if any((work / name).exists() for name in ("uninterrupted", "killed")):
            print(f"FAIL: {work} already holds a soak; give an empty --workdir")
            return 1
        env = env_for(work / "runs")
        launcher = ForkServer(Path(scratch), env) if args.fork else Subprocesses(env)
        try:
            problems = soak(launcher, work, args.kills, args.max_steps, args.seed, args.max_gap,
                            args.max_jitter)
        finally:
            launcher.close()
    if problems:
        print(f"FAIL: {len(problems)} problem(s): " + "; ".join(problems))
        return 1
    print(f"PASS: {args.kills} kills, every checkpoint loaded after each, resumed to step "
          f"{args.max_steps} with weights equal to the uninterrupted run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
