"""Files as they come: names in any encoding, and "files" that are pipes or devices.

Names: a file system holds bytes, and a name need not be UTF-8 (Python reads such bytes as the
surrogates U+DC80..U+DCFF). A run whose --text, --out or prompt is such a name trains, resumes,
generates, evaluates and plots; stdout and stderr print the name's own bytes; runs/latest holds
them; config.toml, which TOML limits to UTF-8, says in a comment what it cannot hold.

Streams: /dev/stdin, <(...) and named pipes are read up to data.text.STREAM_LIMIT bytes, a
config file up to a MiB; /dev/zero is refused at its first chunk (see test_bad_inputs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from charlm.data import text as text_module
from charlm.data.text import read_text
from charlm.errors import CharlmError
from charlm.config.file import load_config_file
from helpers import pydoc_text

NAMES = {"text": b"notes-\xe9t\xe9.txt", "out": b"run-\xff", "prefix": b"for \xfe"}
TINY = ["--hidden", "8", "--layers", "1", "--embed", "4", "--batch-size", "4", "--num-steps",
        "8", "--time-budget", "0", "--eval-every", "4", "--checkpoint-every", "4",
        "--sample-length", "5", "-q"]


def charlm(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m charlm ARGS` with bytes in and out, as a shell runs it."""
    env = {**os.environ, "CHARLM_RUNS_DIR": str(cwd / "runs"), "OMP_NUM_THREADS": "1",
           "LC_ALL": "C.UTF-8"}
    env.pop("CHARLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "charlm", *args], cwd=cwd, env=env,
                          capture_output=True, timeout=300)


@pytest.mark.slow
def test_a_run_named_in_another_encoding_trains_resumes_and_is_read_back(tmp_path):
    name = {k: os.fsdecode(v) for k, v in NAMES.items()}  # what Python makes of those bytes
    pydoc_text(tmp_path / name["text"], 6000)
    train = charlm(["train", "--text", name["text"], "--out", name["out"], "--sample-prefix",
                    name["prefix"], "--max-steps", "4", *TINY], tmp_path)
    assert (train.returncode, train.stderr) == (0, b"")
    run = tmp_path / name["out"]
    assert (tmp_path / "runs" / "latest").read_bytes() == os.fsencode(run) + b"\n"
    config = (run / "config.toml").read_text(encoding="utf-8")  # still UTF-8, still TOML
    # the text and the prompt (out is never in config.toml: a rerun makes its own run folder)
    assert config.count("is not UTF-8, which TOML cannot hold; give it on the command line") == 2
    assert f"# sample_prefix: {NAMES['prefix']!r} is not UTF-8" in config
    assert tomllib.loads(config)["model"]["hidden"] == 8

    resumed = charlm(["train", "--resume", "--max-steps", "8", *TINY], tmp_path)  # via latest
    assert (resumed.returncode, resumed.stderr) == (0, b"")
    generated = charlm(["generate", "--prefix", name["prefix"], "--length", "5", "--seed", "1",
                        "-q"], tmp_path)
    assert generated.returncode == 0
    assert generated.stdout.startswith(NAMES["prefix"])  # printed as the bytes it was given
    assert generated.stderr == (b"charlm: warning: 1 prefix character not in the model's "
                                b"vocabulary, read as <unk>: '\\udcfe'\n")
    scored = charlm(["eval", "perplexity", "--json"], tmp_path)
    assert scored.returncode == 0 and json.loads(scored.stdout)["checkpoint"] == str(run / "best.pt")
    rerun = charlm(["train", "--config", str(run / "config.toml"), "--text", name["text"],
                    "--out", "again", "--max-steps", "4", "-q"], tmp_path)
    assert (rerun.returncode, rerun.stderr) == (0, b"")


@pytest.mark.slow
def test_a_run_named_in_another_encoding_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / os.fsdecode(NAMES["out"])
    pydoc_text(tmp_path / "small.txt", 6000)
    assert charlm(["train", "--text", "small.txt", "--out", str(run), "--max-steps", "4",
                   *TINY], tmp_path).returncode == 0
    plotted = charlm(["plot"], tmp_path)
    assert plotted.returncode == 0, plotted.stderr
    assert plotted.stdout == b"wrote " + os.fsencode(run / "curves.png") + b" (1 run)\n"


# --- pipes and devices --------------------------------------------------------------------------------


def fifo_with(tmp_path: Path, data: bytes) -> Path:
    """A named pipe that a thread fills with `data`, then closes (as `<(...)` does)."""
    path = tmp_path / "pipe"
    os.mkfifo(path)

    def feed():
        with open(path, "wb") as fh:
            try:
                fh.write(data)
            except BrokenPipeError:  # the reader stopped reading: what a cap does
                pass

    threading.Thread(target=feed, daemon=True).start()
    return path


def test_a_pipe_is_read_whole_when_it_ends(tmp_path):
    text = "to be or not to be\n" * 1000
    assert read_text(fifo_with(tmp_path, text.encode()), "--text") == text


def test_a_pipe_longer_than_the_stream_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "STREAM_LIMIT", 1 << 20)
    pipe = fifo_with(tmp_path, b"y\n" * (1 << 21))  # like `yes | charlm train --text /dev/stdin`
    with pytest.raises(CharlmError) as err:
        read_text(pipe, "--text")
    assert str(err.value) == (f"--text {pipe} is not a regular file and sent more than "
                              "1,048,576 bytes; save the text you want to a file and give that")


def test_a_config_file_may_be_a_pipe_but_not_an_endless_one(tmp_path):
    assert load_config_file(fifo_with(tmp_path, b"[model]\nhidden = 64\n")) == {"hidden": 64}
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(Exception) as err:
        load_config_file(big)
    assert str(err.value) == (f"config file {big} is larger than 1 MiB; a config file is a few "
                              "lines of TOML")
