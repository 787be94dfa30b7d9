"""Bad inputs to the real `charlm` command: each is refused with one line, the right exit code,
and not one file created or touched.

Every row runs the `charlm` command in a process of its own, in a folder of its own holding the
same bad files (and a copy of one real tiny run); the folder is snapshot (paths, sizes, mtimes)
before and after. Exit codes: 2 for a wrong command line, including a --config file (options
written in a file); 1 for a bad data file, checkpoint or corpus, a busy run directory, or the
machine (no CUDA, not enough memory).

A fresh `python -m charlm` spends 2-4 s importing torch, which would make this table take minutes.
So each row is a child forked from one warm Python that has imported charlm once: the child gets
its own cwd, environment, argv and stdout/stderr files and runs `charlm/__main__.py` as
`python -m charlm` does (runpy); its exit status is the row's exit code. A few rows also run as
plain `[sys.executable, "-m", "charlm", ...]` subprocesses, to show the fork changes nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from forkserver import ForkServer

# Slow (the whole table of bad inputs, each in a process of its own): left out of `pytest -m "not slow"`.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
import torch

TIMEOUT = 120  # seconds per subprocess: a wrongly accepted input still ends in a few
# Tiny trainer settings: even an input that is wrongly accepted trains one small step only.
FAST = ("--max-steps", "1", "--time-budget", "0", "--hidden", "8", "--batch-size", "4",
        "--num-steps", "8", "-q")
RESUMED = "drop the option or start a new run"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # after `charlm`; {small} is the absolute path of a good corpus
    code: int
    line: str  # the whole stderr line after "charlm: error: " (a regex when `regex`)
    regex: bool = False
    lock: bool = False  # hold run/run.lock, as a live trainer does, while the row runs
    marks: tuple = ()


def train(*args: str) -> tuple[str, ...]:
    return ("train", *FAST, "--text", "{small}", "--out", "new", *args)


def train_on(*text: str) -> tuple[str, ...]:
    return ("train", *FAST, *(a for t in text for a in ("--text", t)), "--out", "new")


CASES = [
    # options: exit 2
    Case("unknown-cell", train("--cell", "transformer"), 2,
         "--cell must be one of rnn, gru, lstm, mingru, minlstm; got 'transformer'"),
    Case("bidirectional", train("--bidirectional"), 2,
         "--bidirectional is not supported: a bidirectional layer reads the characters it is "
         "asked to predict, so it cannot be a language model"),
    Case("hidden-zero", train("--hidden", "0"), 2, "--hidden must be an integer in [1, 16777216], got 0"),
    Case("layers-negative", train("--layers", "-1"), 2, "--layers must be an integer in [1, 1024], got -1"),
    Case("batch-zero", train("--batch-size", "0"), 2, "--batch-size must be an integer >= 1, got 0"),
    Case("num-steps-negative", train("--num-steps", "-5"), 2, "--num-steps must be an integer >= 1, got -5"),
    Case("dropout-one", train("--dropout", "1"), 2, "--dropout must be in [0, 1), got 1.0"),
    Case("dropout-negative", train("--dropout", "-0.1"), 2, "--dropout must be in [0, 1), got -0.1"),
    Case("lr-zero", train("--lr", "0"), 2, "--lr must be a positive number, got 0.0"),
    Case("lr-negative", train("--lr", "-1"), 2, "--lr must be a positive number, got -1.0"),
    Case("unknown-optimizer", train("--optimizer", "lbfgs"), 2,
         "--optimizer must be one of sgd, adam, adamw; got 'lbfgs'"),
    Case("unknown-schedule", train("--schedule", "exp"), 2,
         "--schedule must be one of none, cosine, plateau; got 'exp'"),
    Case("unknown-corpus", ("train", *FAST, "--corpus", "nosuch", "--out", "new"), 2,
         "unknown corpus 'nosuch': choose one of enwik8, python-docs, text8, timemachine, tinyshakespeare, "
         "or give a text file or URL"),
    Case("seed-out-of-range", train("--seed", str(10**23)), 2, r"--seed must be .+", regex=True),
    Case("resume-with-out", ("train", "--resume", "run", "--out", "elsewhere"), 2,
         "--out cannot be combined with --resume (a run resumes in its own directory)"),
    Case("resume-other-cell", ("train", "--resume", "run", "--cell", "lstm"), 2,
         f"--cell lstm disagrees with the checkpoint (gru) being resumed; {RESUMED}"),
    Case("resume-other-hidden", ("train", "--resume", "run", "--hidden", "32"), 2,
         f"--hidden 32 disagrees with the checkpoint (16) being resumed; {RESUMED}"),
    Case("resume-other-layers", ("train", "--resume", "run", "--layers", "2"), 2,
         f"--layers 2 disagrees with the checkpoint (1) being resumed; {RESUMED}"),
    Case("resume-other-embed", ("train", "--resume", "run", "--embed", "4"), 2,
         f"--embed 4 disagrees with the checkpoint (8) being resumed; {RESUMED}"),
    Case("temperature-negative", ("generate", "--checkpoint", "model.pt", "--temperature", "-1"),
         2, "--temperature must be a number >= 0 (0: greedy), got -1.0"),
    Case("top-k-negative", ("generate", "--checkpoint", "model.pt", "--top-k", "-1"), 2,
         "--top-k must be >= 0 (0: off), got -1"),
    Case("top-p-zero", ("generate", "--checkpoint", "model.pt", "--top-p", "0"), 2,
         "--top-p must be in (0, 1], got 0.0"),
    Case("top-p-above-one", ("generate", "--checkpoint", "model.pt", "--top-p", "1.5"), 2,
         "--top-p must be in (0, 1], got 1.5"),
    Case("length-zero", ("generate", "--checkpoint", "model.pt", "--length", "0"), 2,
         "--length must be a positive integer, got 0"),
    # config files: options written in a file, so exit 2 as well
    Case("config-malformed", train("--config", "malformed.toml"), 2,
         "config file malformed.toml is not valid TOML: Invalid value (at line 1, column 10)"),
    Case("config-unknown-key", train("--config", "unknown.toml"), 2,
         "unknown key 'model.hiddn' in config file unknown.toml; see 'charlm train --help' "
         "for the keys (option names with - written as _)"),
    Case("config-wrong-type", train("--config", "wrongtype.toml"), 2,
         "key 'hidden' in config file wrongtype.toml must be an integer, got 'big'"),
    Case("config-missing", train("--config", "nosuch.toml"), 2,
         "config file nosuch.toml does not exist"),
    # data files: exit 1
    Case("text-missing", train_on("missing.txt"), 1,
         "missing.txt does not exist; check the path"),
    Case("text-empty", train_on("empty.txt"), 1,
         "empty.txt is empty; give a file that holds some text"),
    Case("text-directory", train_on("adir"), 1,
         "adir is a directory; give a UTF-8 text file"),
    Case("text-binary", train_on("{small}", "binary.bin"), 1,
         "binary.bin is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); "
         "give a UTF-8 text file"),
    Case("text-latin1", train_on("latin1.txt"), 1,
         "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3); convert it first, e.g. "
         "iconv -f latin1 -t utf-8 latin1.txt > latin1.utf8.txt"),
    Case("corpus-shorter-than-a-batch", train_on("short.txt"), 1,
         "corpus too short: 11 tokens make no batch of 4 x 8 (need at least 40); use a smaller "
         "--batch-size or --num-steps, or a longer text"),
    Case("data-add-bad-checksum", ("data", "add", "timemachine", "junk.txt"), 1,
         r"junk\.txt is not the expected timemachine\.txt: sha256 mismatch \(got [0-9a-f]{64}, "
         r"expected 8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516\); "
         r"nothing was written", regex=True),
    Case("eval-empty-text",
         ("eval", "perplexity", "--checkpoint", "model.pt", "--text", "empty.txt"), 1,
         "--text empty.txt is empty: nothing to evaluate; give a file of at least 2 characters"),
    # checkpoints: exit 1
    Case("checkpoint-missing", ("generate", "--checkpoint", "nosuch.pt"), 1,
         "checkpoint or run directory nosuch.pt does not exist"),
    Case("checkpoint-is-text", ("generate", "--checkpoint", "notes.pt"), 1,
         "notes.pt is not a charlm checkpoint (not a file written by torch.save)"),
    Case("checkpoint-truncated", ("eval", "perplexity", "--checkpoint", "cut.pt"), 1,
         r"cut\.pt is truncated or damaged \(.+\); use another checkpoint, e\.g\. best\.pt or "
         r"last\.pt of the same run", regex=True),
    Case("checkpoint-newer-format", ("generate", "--checkpoint", "newer.pt"), 1,
         "newer.pt is checkpoint format version 2, newer than this charlm reads (1); "
         "upgrade charlm"),
    # the machine and the run directory: exit 1
    Case("device-cuda-without-cuda", train("--device", "cuda"), 1,
         "--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is "
         "False); use --device cpu or auto",
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),)),
    Case("out-under-a-file", ("train", *FAST, "--text", "{small}", "--out", "afile/run"), 1,
         "cannot create run directory afile/run: Not a directory"),
    Case("out-is-a-file", ("train", *FAST, "--text", "{small}", "--out", "afile"), 1,
         "--out afile exists and is not a directory; choose another --out"),
    Case("run-dir-locked", ("train", "--resume", "run", "--max-steps", "12", "-q"), 1,
         "run is in use by a running trainer (pid {pid}); wait for it to finish or choose "
         "another --out", lock=True),
    Case("model-larger-than-memory", train("--device", "cpu", "--hidden", str(2**24)), 1,
         r"out of memory \(tried to allocate [\d,.]+ GiB\); use a smaller model or batch "
         r"\(e\.g\. --hidden, --batch-size\)", regex=True),
    # unbounded inputs: special files are streamed with a cap, and refused at their first chunk
    # of NUL bytes; a config file is read up to a MiB (exit 1, or 2 for the config file)
    Case("text-dev-zero", train_on("/dev/zero"), 1,
         "/dev/zero is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); give a "
         "UTF-8 text file"),
    Case("prefix-file-dev-zero", ("generate", "--checkpoint", "model.pt", "--prefix-file",
                                  "/dev/zero"), 1,
         "--prefix-file /dev/zero is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 "
         "file); give a UTF-8 text file"),
    Case("eval-text-dev-zero", ("eval", "perplexity", "--checkpoint", "model.pt", "--text",
                                "/dev/zero"), 1,
         "--text /dev/zero is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); "
         "give a UTF-8 text file"),
    Case("data-info-dev-zero", ("data", "info", "/dev/zero"), 1,
         "/dev/zero is not UTF-8 text (it holds NUL bytes, like a binary or UTF-16 file); give a "
         "UTF-8 text file"),
    Case("data-add-dev-zero", ("data", "add", "timemachine", "/dev/zero"), 1,
         "/dev/zero is not a file; give the path of your copy of timemachine.txt"),
    Case("data-dir-is-a-file", ("train", *FAST, "--corpus", "timemachine", "--data-dir",
                                "afile", "--out", "new"), 1,
         "cannot create the cache folder afile: File exists"),
    Case("config-dev-zero", train("--config", "/dev/zero"), 2,
         "config file /dev/zero is larger than 1 MiB; a config file is a few lines of TOML"),
    # numbers at their extremes, typed or in a config file: exit 2, never an overflow in C++
    Case("hidden-2-to-the-62", train("--hidden", str(2**62)), 2,
         f"--hidden must be an integer in [1, 16777216], got {2**62}"),
    Case("embed-2-to-the-62", train("--embed", str(2**62)), 2,
         f"--embed must be an integer in [0, 16777216], got {2**62}"),
    Case("layers-2-to-the-62", train("--layers", str(2**62)), 2,
         f"--layers must be an integer in [1, 1024], got {2**62}"),
    Case("config-seed-beyond-64-bits", train("--config", "bigseed.toml"), 2,
         f"key 'run.seed' in config file bigseed.toml must be an integer in [0, 2**63), got {2**64}"),
    Case("config-hidden-int64-max", ("train", "--text", "{small}", "--max-steps", "1", "-q",
                                     "--out", "new", "--config", "bighidden.toml"), 2,
         f"key 'hidden' in config file bighidden.toml must be an integer in [1, 16777216], "
         f"got {2**63 - 1}"),
    Case("lr-beyond-float64", train("--lr", "1e309"), 2, "--lr must be a positive number, got inf"),
    Case("generate-seed-beyond-64-bits", ("generate", "--checkpoint", "model.pt", "--seed",
                                          str(2**64)), 2,
         f"--seed must be an integer in [0, 2**63), got {2**64}"),
]


# --- fixtures ----------------------------------------------------------------------------------


def populate(folder: Path, tiny: Path) -> None:
    """The bad files every row may name, and a copy of the tiny run."""
    folder.mkdir()
    (folder / "empty.txt").write_bytes(b"")
    (folder / "adir").mkdir()
    (folder / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (folder / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (folder / "short.txt").write_text("hello world\n", encoding="utf-8")
    (folder / "junk.txt").write_text("not the time machine\n", encoding="utf-8")
    (folder / "afile").write_text("a plain file\n", encoding="utf-8")
    (folder / "notes.pt").write_text("some notes, renamed .pt\n", encoding="utf-8")
    (folder / "malformed.toml").write_text("hidden = \n", encoding="utf-8")
    (folder / "unknown.toml").write_text("[model]\nhiddn = 3\n", encoding="utf-8")
    (folder / "wrongtype.toml").write_text('hidden = "big"\n', encoding="utf-8")
    (folder / "bigseed.toml").write_text(f"[run]\nseed = {2**64}\n", encoding="utf-8")
    (folder / "bighidden.toml").write_text(f"hidden = {2**63 - 1}\n", encoding="utf-8")
    shutil.copytree(tiny / "run", folder / "run")
    good = tiny / "run" / "best.pt"
    shutil.copy2(good, folder / "model.pt")
    data = good.read_bytes()
    (folder / "cut.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "version": 2}, folder / "newer.pt")


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (and root itself): type, size, mtime in ns."""
    seen = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return seen


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


def plain_subprocess(args: list[str], cwd: Path, env: dict) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "charlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout, proc.stderr


def check_case(case: Case, folder: Path, small: Path, runner) -> None:
    """Run one row in `folder` and assert everything the table promises."""
    env = {**os.environ, "CHARLM_RUNS_DIR": str(folder / "runs"),
           "CHARLM_DATA_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    for name in ("CHARLM_DEBUG", "CHARLM_MIRROR"):
        env.pop(name, None)
    args = [a.replace("{small}", str(small)) for a in case.args]
    lock = None
    if case.lock:  # what rundir.RunLock does in a live trainer
        lock = open(folder / "run" / "run.lock", "a+", encoding="utf-8")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
    try:
        before = snapshot(folder)
        code, stdout, stderr = runner(args, folder, env)
        after = snapshot(folder)
    finally:
        if lock is not None:
            lock.close()
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("charlm: error: "), stderr
    message = lines[0].removeprefix("charlm: error: ")
    expected = case.line.replace("{pid}", str(os.getpid()))
    if case.regex:
        assert re.fullmatch(expected, message), message
    else:
        assert message == expected
    assert code == case.code, stderr
    assert stdout == ""
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"files created or changed: {sorted(changed)}"


# --- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_with_one_line(case: Case, tiny_run, fork_server, tmp_path):
    populate(tmp_path / "row", tiny_run)
    check_case(case, tmp_path / "row", tiny_run / "small.txt", fork_server.run)


PLAIN = ["hidden-zero", "run-dir-locked"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.id in PLAIN])
def test_a_plain_subprocess_is_refused_alike(case: Case, tiny_run, tmp_path):
    populate(tmp_path / "row", tiny_run)
    check_case(case, tmp_path / "row", tiny_run / "small.txt", plain_subprocess)


def test_the_table_covers_the_issue():
    assert len(CASES) >= 25 and {c.code for c in CASES} == {1, 2}
    assert {c.id for c in CASES} >= set(PLAIN)
