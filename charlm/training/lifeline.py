"""A rank's tie to the process that started it (the `--nproc` launcher, or torchrun).

The launcher forwards the signals it gets (SIGINT, SIGTERM, SIGHUP) to its ranks, which then stop
and save. A launcher killed outright (SIGKILL, the OOM killer) forwards nothing: without this,
its ranks would train on as orphans for hours, holding the run's lock.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_ENV = "CHARLM_LAUNCHER_PID"  # set by `--nproc`'s launcher for its ranks
_PR_SET_PDEATHSIG = 1
_parent: int | None = None  # the parent this process is tied to, once it is


def _prctl(sig: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies, so a rank stops as
    on Ctrl-C, saved. Elsewhere (no prctl) nothing happens."""
    global _parent
    if not sys.platform.startswith("linux") or not _prctl(int(signal.SIGTERM)):
        return
    _parent = os.getppid()
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit() and _parent != int(launcher):  # it died before prctl took hold
        os.kill(os.getpid(), signal.SIGTERM)


def orphaned() -> bool:
    """Whether the parent this process was tied to has died (or is dying: a zombie). The
    kernel's signal is then switched off: it may come more than once (once per thread that
    exits, again when a subreaper the orphan was handed to dies), and a repeat must not read
    as a second Ctrl-C (stop at once, unsaved)."""
    if _parent is None:
        return False
    if os.getppid() == _parent:
        try:
            with open(f"/proc/{_parent}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return False
        except (OSError, IndexError):
            pass
    _prctl(0)
    return True
