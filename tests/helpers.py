"""What several test modules share: a small offline corpus, tiny real runs, the CLI in process.

Fixtures live in conftest.py; these are plain functions, imported by name (`from helpers import
pydoc_text`).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from pathlib import Path

import pytest

# The reference corpora (timemachine.txt, tinyshakespeare.txt), read in place, never copied:
# $CHARLM_SHARED_DATA, else ../shared/data beside the repository.
SHARED_DATA = Path(os.environ.get("CHARLM_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# Tiny-run training options: a model that trains in well under a second per step on one thread.
TINY = ["--hidden", "16", "--batch-size", "4", "--num-steps", "8", "--max-steps", "20",
        "--time-budget", "0", "--eval-every", "10", "--checkpoint-every", "10", "--log-every", "5",
        "-q"]


def pydoc_text(path: Path, chars: int) -> Path:
    """Write `chars` characters of English prose and code from the stdlib's own docs (offline,
    always there) to `path`: the tests' small corpus."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:chars], encoding="utf-8")
    return path


def refused_port() -> int:
    """A loopback port that nothing listens on: bound once, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(*args: str):
    """`charlm ARGS` in process through Typer's test runner (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from charlm.cli.app import app

    return CliRunner().invoke(app, list(args))


def run_main(args: list[str]) -> tuple[int, str, str]:
    """`charlm ARGS` in process, through the console entry point (main), as the shell runs it:
    (exit code, stdout, stderr)."""
    from charlm.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def train_runs(root: Path, runs: dict[str, list[str]], text_chars: int = 6000,
               common: list[str] = TINY) -> dict[str, Path]:
    """Real tiny runs of `charlm train` on `root/small.txt`, one per name (its extra options),
    trained in order (the last one is `latest`); returns {name: run dir, "root", "text"}."""
    text = pydoc_text(root / "small.txt", text_chars)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_RUNS_DIR", str(root / "runs"))
        mp.setenv("CHARLM_DATA_DIR", str(root / "cache"))
        for name, extra in runs.items():
            result = invoke("train", "--text", str(text), *common, *extra, "--out", str(root / name))
            assert result.exit_code == 0, result.output
    return {"root": root, "text": text, **{name: root / name for name in runs}}


def no_float64():
    """A dispatch mode in which any op with a float64 tensor in or out fails, as on Apple's MPS
    (which has no float64)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    raise RuntimeError(f"{func} used float64, which MPS does not have")
            return out

    return NoFloat64()
