"""How long torch's OpenMP threads spin before they sleep, chosen once before torch loads.

libgomp reads GOMP_SPINCOUNT when it starts and never again. A waiting thread spins that many
times, then sleeps in the kernel until it is woken:

* beside busy processes, a thread waiting for a descheduled partner spins away its own share
  of the core at every op of a step, so two threads run many times slower than one; 1,000
  spins give the core back within microseconds;
* on an idle machine (a VM above all), every sleep costs a wake-up at the next parallel region:
  the gaps between a step's ops (Python, the optimizer, the loss) outlast 1,000 spins, so the
  second thread sleeps and is woken tens of times per step.

The figures of both are in docs/BENCHMARKS.md (CPU threads; the fast GRU against an older
charlm).

So the long spin is kept only on a machine found idle when charlm starts: no other runnable
task at any of a few reads of the run queue, and a load average within the CPUs. A machine
that gets busy later is met by the thread chooser (charlm.system.threads): one thread has nothing to
wait for, whatever the spin.
"""

from __future__ import annotations

import os
import time

BUSY_SPINS = "1000"  # libgomp's own count when it sees more threads than CPUs is 100
SAMPLES = 5  # reads of the run queue, GAP_S apart: ~5 ms at start-up
GAP_S = 0.001


def others_running(samples: int = SAMPLES, gap: float = GAP_S, stat: str = "/proc/stat") -> list[int] | None:
    """Runnable tasks besides this process at each of `samples` reads of the kernel's run
    queue (procs_running, which counts the reader itself); None where it cannot be read."""
    seen = []
    for i in range(samples):
        if i:
            time.sleep(gap)
        try:
            with open(stat, "rb") as f:
                line = next((ln for ln in f if ln.startswith(b"procs_running ")), None)
        except OSError:
            return None
        if line is None:
            return None
        seen.append(max(0, int(line.split()[1]) - 1))
    return seen


def machine_is_quiet(seen: list[int] | None, load: float, cpus: int) -> bool:
    """No other task wanted a CPU at any read, and the last minute's load average was within
    the CPUs (a run queue read empty between the tests of a busy machine is not quiet: the
    long spin there costs far more than it gains on an idle one); unknown is not quiet."""
    return bool(seen) and not any(seen) and load <= cpus + 0.5


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("inf")


def spin_count(environ=os.environ, probe=None, load=None, cpus=None) -> str | None:
    """The GOMP_SPINCOUNT this process should set: None to leave libgomp's own (300,000) on a
    quiet machine, or where the environment already names a policy; BUSY_SPINS otherwise."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    quiet = machine_is_quiet((probe or others_running)(), _load() if load is None else load,
                             cpus or os.cpu_count() or 1)
    return None if quiet else BUSY_SPINS
