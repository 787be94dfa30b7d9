"""Stopping a run on request: SIGINT and SIGTERM end it at the next step boundary, saved.

    first signal    its name is appended to the trainer's `stop_signal`; the loop finishes the
                    step it is in, saves last.pt and raises Interrupted (exit 130, with the
                    command that resumes the run)
    second signal   KeyboardInterrupt at once: the step is torn, so nothing is saved
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the loop stopped at a step boundary and saved a checkpoint."""

    def __init__(self, checkpoint: Path | None, signame: str, step: int):
        super().__init__(signame)
        self.checkpoint, self.signame, self.step = checkpoint, signame, step


@contextmanager
def stop_requests(stop_signal: list[str]):
    """SIGINT/SIGTERM ask the loop to stop after the current step (their name is appended to
    `stop_signal`); a second one stops at once (KeyboardInterrupt)."""

    def on_signal(signum, frame):
        if stop_signal:  # a second Ctrl-C: stop now, without waiting for the step
            raise KeyboardInterrupt
        stop_signal.append(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
