"""Commands run as children forked from one warm Python that has imported charlm (0.1 s a
start instead of 3-5 s), for tests that run many short `charlm` processes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

TIMEOUT = 120  # seconds per command: a wrongly accepted input still ends in a few


# A warm Python with charlm imported; per JSON request line it forks a child that runs
# `python -m charlm ARGS` in the request's cwd and environment, and answers the exit status.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import charlm.cli.app  # torch, typer, rich: imported once, here
import torch._dynamo  # torch.optim imports it when the first optimizer is made: 1-2 s more

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            for fd, name, flags in ((0, os.devnull, os.O_RDONLY),
                                    (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                    (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                os.dup2(os.open(name, flags, 0o644), fd)
            sys.argv = [sys.executable, *req["args"]]
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
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class ForkServer:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)

    def run(self, args: list[str], cwd: Path, env: dict) -> tuple[int, str, str]:
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"args": args, "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        if not ready:
            self.close()
            raise TimeoutError(f"charlm {' '.join(args)} ran over {TIMEOUT} s")
        code = json.loads(self.proc.stdout.readline())
        return code, out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
