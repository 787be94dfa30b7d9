"""Stopping a run on request: SIGINT, SIGTERM and SIGHUP end it at the next step boundary, saved.

    first signal    its name is appended to the trainer's `stop_signal`; the loop finishes the
                    step it is in, saves last.pt and raises Interrupted (exit 130, with the
                    command that resumes the run)
                    during work that can be dropped (`StopRequests.abandonable()`: an evaluation
                    and its sample, which change nothing the run resumes from) it raises
                    Abandoned at once, so a long sample does not keep the user waiting
    second signal   KeyboardInterrupt at once: the step is torn, so nothing is saved

SIGHUP is the terminal closing: the run is saved as on Ctrl-C, not lost; under `nohup` (SIGHUP
ignored) it stays ignored.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

from charlm.training.lifeline import orphaned

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal arrived: the loop stopped at a step boundary and saved a checkpoint."""

    def __init__(self, checkpoint: Path | None, signame: str, step: int):
        super().__init__(signame)
        self.checkpoint, self.signame, self.step = checkpoint, signame, step


class Abandoned(Exception):
    """A stop signal arrived during abandonable work (an evaluation, a sample)."""


class StopRequests:
    """What the signal handler does, and where it may cut work short."""

    def __init__(self, stop_signal: list[str]):
        self.stop_signal = stop_signal
        self._abandonable = False

    def on_signal(self, signum, frame) -> None:
        if self.stop_signal:  # a second Ctrl-C: stop now, without waiting for the step
            if signum == signal.SIGTERM and orphaned():
                return  # the parent-death signal again (charlm.training.lifeline): stopping
            raise KeyboardInterrupt
        self.stop_signal.append(signal.Signals(signum).name)
        orphaned()  # (switches that signal off once the parent is gone)
        if self._abandonable:
            raise Abandoned

    @contextmanager
    def abandonable(self, allowed: bool = True):
        """Work a stop request may cut short (raising Abandoned); `allowed` False (ranks of a
        process group, whose evaluation is a collective) lets it finish instead."""
        if allowed and self.stop_signal:
            raise Abandoned
        self._abandonable = allowed
        try:
            yield
        finally:
            self._abandonable = False


@contextmanager
def stop_requests(requests: StopRequests):
    """While inside, SIGINT/SIGTERM/SIGHUP ask the loop to stop after the current step (their
    name is appended to `requests.stop_signal`); a second one stops at once (KeyboardInterrupt)."""
    old = {s: signal.signal(s, requests.on_signal) for s in STOP_SIGNALS
           if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}  # nohup
    try:
        yield requests
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
