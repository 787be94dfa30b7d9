"""The fork server the process-heavy tests share (tests/forkserver.py): a child is `charlm` as
`python -m charlm` runs it, and a child that runs over its time is killed, not the server."""

from __future__ import annotations

import os

import pytest

from forkserver import ForkServer
from helpers import pydoc_text

pytestmark = pytest.mark.slow  # the server imports torch before its first child


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


def test_a_child_gets_its_own_cwd_env_and_output(server, tmp_path):
    env = {**os.environ, "CHARLM_RUNS_DIR": str(tmp_path / "none")}
    env.pop("CHARLM_DEBUG", None)
    assert server.run(["--version"], tmp_path, env) == (0, "charlm 0.1.0\n", "")
    assert server.run(["generate"], tmp_path, env) == (1, "", (
        f"charlm: error: no runs yet in {tmp_path / 'none'}/: train one first with `charlm "
        "train`, or pass --checkpoint PATH\n"))
    assert server.run(["train", "--cell", "gur"], tmp_path, env)[0] == 2


def test_a_child_over_its_time_is_killed_and_the_server_goes_on(server, tmp_path):
    text = pydoc_text(tmp_path / "small.txt", 20_000)
    args = ["train", "--text", str(text), "--hidden", "8", "--max-steps", "1000000",
            "--time-budget", "0", "-q", "--out", str(tmp_path / "run")]
    with pytest.raises(TimeoutError, match=r"ran over 2 s"):
        server.run(args, tmp_path, None, timeout=2)
    assert server.run(["--version"], tmp_path, None) == (0, "charlm 0.1.0\n", "")
    child = server.start(["--version"], tmp_path, stdout=True)
    assert child.wait() == 0 and child.communicate() == ("charlm 0.1.0\n", "")
