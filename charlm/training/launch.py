"""`charlm train --nproc N`: start N ranks of a data-parallel run on this machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


GRACE_S = 10.0  # after one rank fails, how long the others get to stop by themselves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m charlm <args>` as `nproc` ranks on this machine; return the exit code.

    Like `torchrun --standalone --nproc-per-node N`, but a failure stays the ranks' own one-line
    error and exit code (torchrun wraps it in a traceback and exit code 1). Each rank starts in
    its own session, so a Ctrl-C reaches it exactly once, forwarded from here. When one rank
    fails, the others get GRACE_S seconds, then SIGTERM, then SIGKILL.
    """
    base = dict(os.environ if env is None else env)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: signals stay with the caller
        pass
    try:
        for rank in range(nproc):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", "charlm", *args], env=rank_env,
                                          start_new_session=True))
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                _stop(procs)
                break
            time.sleep(0.05)
    finally:
        _stop(procs)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    codes = [1 if p.returncode is None else p.returncode if p.returncode >= 0 else 128 - p.returncode
             for p in procs]
    return codes[0] or next((c for c in codes if c), 0)  # rank 0's, which reported the error


def _stop(procs: list[subprocess.Popen]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.send_signal(sig)
        for p in alive:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
