"""`charlm` commands run as children forked from one warm Python that has imported charlm and
torch (~0.1 s a start instead of 2-4 s of imports): for tests that run many short `charlm`
processes (tests/cli/test_bad_inputs.py, tests/artifacts/test_hostile_checkpoints.py) and for the
crash soak's kill loop (tests/soak.py, tests/artifacts/test_crash_safety.py).

A child is `python -m charlm ARGS` in all but its start: it gets its own cwd, environment, argv
and stdout/stderr files and runs `charlm/__main__.py` through runpy, as `python -m` does; its exit
status is the command's exit code. Its threads are the server's: the server starts with
OMP_NUM_THREADS=1 unless given an environment.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

TIMEOUT = 120  # seconds per `run`: a wrongly accepted input still ends in a few

# Per JSON request line: {"start": ARGS, "cwd", "env", "stdout", "stderr"} forks a child and
# answers its pid; {"wait": PID, "block": bool} answers its exit code (null: still running).
_SERVER = r"""
import json, os, runpy, sys, traceback
import charlm.cli.app  # torch, typer, rich: imported once, here
import torch._dynamo  # torch.optim imports it when the first optimizer is made: 1-2 s more


def child(req):
    code = 1
    try:
        if req["cwd"] is not None:
            os.chdir(req["cwd"])
        if req["env"] is not None:
            os.environ.clear()
            os.environ.update(req["env"])
        out = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], out),
                                (2, req["stderr"], out)):
            os.dup2(os.open(name, flags, 0o644), fd)
        sys.argv = [sys.executable, *req["start"]]
        try:
            runpy.run_module("charlm", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
            if isinstance(exc.code, str):
                sys.stderr.write(exc.code + "\n")
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        pid, status = os.waitpid(req["wait"], 0 if req["block"] else os.WNOHANG)
        answer = os.waitstatus_to_exitcode(status) if pid else None
    else:
        answer = os.fork()
        if answer == 0:
            child(req)
    print(json.dumps(answer), flush=True)
"""


class ForkedProcess:
    """The part of subprocess.Popen the tests use, for a child of the fork server."""

    def __init__(self, server: "ForkServer", pid: int, stdout: Path | None, stderr: Path):
        self.server, self.pid = server, pid
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.ask({"wait": self.pid, "block": False})
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; a child still running after `timeout` seconds is killed, and
        TimeoutError raised."""
        if self.returncode is None:
            request = {"wait": self.pid, "block": True}
            try:
                self.returncode = self.server.ask(request, timeout)
            except TimeoutError:
                self.kill()
                self.returncode = self.server.answer()
                raise TimeoutError(f"pid {self.pid} ran over {timeout} s: killed") from None
        return self.returncode

    def communicate(self) -> tuple[str | None, str]:
        """Wait for the child: (its stdout, None where it went to /dev/null; its stderr)."""
        self.wait()
        out = (self.stdout_path.read_text(encoding="utf-8", errors="replace")
               if self.stdout_path is not None else None)
        return out, self.stderr_path.read_text(encoding="utf-8", errors="replace")


class ForkServer:
    """One warm Python that forks a `charlm` child per `start` (Popen-like) or `run` (to the
    end). `env`: the server's environment, which children inherit unless a call gives theirs
    (default: this process's, on one thread); `scratch`: a folder for the children's output."""

    def __init__(self, scratch: Path, env: dict | None = None):
        self.scratch, self.count = Path(scratch), 0
        env = env if env is not None else {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)

    def ask(self, request: dict, timeout: float | None = None):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        if timeout is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
        return self.answer()

    def answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def start(self, args: list[str], cwd: Path | None = None, env: dict | None = None,
              stdout: bool = False) -> ForkedProcess:
        """Fork `charlm ARGS` (in `cwd`, with `env`: the server's where None); its stderr goes
        to a file, its stdout too when `stdout`, else to /dev/null."""
        self.count += 1
        out = self.scratch / f"{self.count}.stdout" if stdout else None
        err = self.scratch / f"{self.count}.stderr"
        pid = self.ask({"start": list(args), "cwd": None if cwd is None else str(cwd),
                        "env": env, "stdout": str(out) if out else os.devnull,
                        "stderr": str(err)})
        return ForkedProcess(self, pid, out, err)

    def run(self, args: list[str], cwd: Path | None = None, env: dict | None = None,
            timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """`charlm ARGS` to its end: (exit code, stdout, stderr)."""
        child = self.start(args, cwd, env, stdout=True)
        try:
            child.wait(timeout)
        except TimeoutError:
            raise TimeoutError(f"charlm {' '.join(args)} ran over {timeout} s") from None
        out, err = child.communicate()
        return child.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
