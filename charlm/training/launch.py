"""`charlm train --nproc N`: start N ranks of a data-parallel run on this machine.

PyTorch's own launcher does the work (`torch.distributed.launcher.api.elastic_launch`, what
`torchrun --standalone --nproc-per-node N` runs): a rendezvous on a free local port, one
`python -m charlm train ...` per rank, each in its own session, so a Ctrl-C reaches a rank once,
forwarded by the launcher (SIGINT, SIGTERM, SIGHUP and SIGQUIT alike), and the ranks get
SHUTDOWN_S seconds to save and stop before they are killed. A launcher killed outright (SIGKILL)
forwards nothing: each rank asked the kernel for a SIGTERM when its parent dies
(`charlm.training.lifeline`), so they stop and save all the same. What charlm adds: the launcher's
log lines stay quiet, and a failed run ends with the ranks' own one-line error and exit code
instead of torchrun's traceback and exit code 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import uuid
from contextlib import contextmanager

from charlm.training.lifeline import LAUNCHER_ENV

SHUTDOWN_S = 300  # after a signal or a failed rank, how long the ranks get to save and stop
MONITOR_S = 0.2  # how often the launcher looks at its ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _quiet_launcher():
    """torch.distributed.elastic logs every start, signal and failure on stderr; the ranks say
    what matters themselves."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:  # each has its own level and handler (elastic.utils.logging)
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before):
            logger.disabled = disabled


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m charlm <args>` as `nproc` ranks on this machine; return the exit code."""
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401 (its logger)
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the ranks stop (saved) when this process dies, however it dies (distributed.from_env)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="charlm-launch-") as logs, _quiet_launcher():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            monitor_interval=MONITOR_S, shutdown_timeout=SHUTDOWN_S,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "charlm", *args)
        except ChildFailedError as exc:
            # the first rank to fail names the cause (rank 0 has printed it); the others were
            # stopped because of it
            first = min(exc.failures.values(), key=lambda f: f.timestamp)
            return _exit_code(first.exitcode)
        except SignalException as exc:
            return 128 + int(exc.sigval)
    return 0


def _exit_code(code: int) -> int:
    """A rank's exit code as a shell reports it: a death by signal N is 128 + N."""
    return 128 - code if code < 0 else code
