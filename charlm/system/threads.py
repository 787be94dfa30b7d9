"""CPU threads for repeated work (training steps, evaluation windows), chosen by timing it.

On an idle 2-core machine two threads run a step of the shipped models faster than one; beside
other busy processes the second thread's core is often taken, every op of a step then waits for
it, and one thread is the faster (figures: docs/BENCHMARKS.md, CPU threads). No fixed count
is right for both, and a machine's load changes during a run, so the trainer tries both counts
at the start of every period of steps and keeps the faster until the next period::

    warm-up, 10 steps:  A ...      (the first steps allocate and fault in memory: timing
                                    them made the first trial pick one thread on an idle
                                    machine, and keep it for the whole first period)
    period of 200 steps:  A . . . .  B . . . .  the faster of A and B, 190 steps  | A . . . .
                          one untimed step per count (the switch), then 4 timed; the faster
                          is the lower median step time. A: one thread per core, B: one.

The slower count's 5 steps are a small share of a period's 200. Evaluation uses the same
chooser per window (`for_stream`): `eval perplexity`'s single stream runs 512-character windows
whose input and output products split well on an idle machine, while
beside busy processes one thread can be the faster. The thread count changes no
number of a step (matrix products split their outputs, not their sums, and torch's reductions
chunk independently of the thread count: checked bitwise in tests/system/test_threads.py), so a run's
results do not depend on which count ran when. `--threads N` fixes the count; a model under
`SMALL_WORK` always gets one thread; on CUDA nothing is chosen. The count a chooser
leaves set is put back by the caller (`threads_within`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from contextlib import contextmanager

import torch

# rows x hidden units of a step's matrix products under which a second thread costs more (its
# fork and join, every op) than it saves: the test models (4 x 16), not the shipped configs
# (32-64 x 256 and up)
SMALL_WORK = 16 * 256


def use_threads(n: int) -> None:
    """Run torch's CPU ops on `n` intra-op threads (at least 1)."""
    torch.set_num_threads(max(1, int(n)))


@contextlib.contextmanager
def threads_within(n: int):
    """torch's CPU ops on `n` intra-op threads inside the block; the count before it comes back
    after, whatever happens."""
    before = torch.get_num_threads()
    use_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(kind: str, hidden: int, rows: int, requested: int = 0) -> int:
    """CPU threads for one kind of work: "train" (steps of `rows` sequences through layers of
    `hidden` units; the trainer's validation too) or "stream" (a character at a time: generation,
    `sample.generate`), whose matrix-vector products are too small to split. `requested` > 0
    (--threads) wins. (Evaluation windows time their count: `threads.ThreadChooser`.)"""
    if requested > 0:
        return requested
    if kind == "stream" or rows * hidden < SMALL_WORK:
        return 1
    return _TORCH_DEFAULT


_TORCH_DEFAULT = torch.get_num_threads()  # one per core, or OMP_NUM_THREADS: torch's own choice


PERIOD = 200  # steps between trials
TRIAL = 4  # timed steps per count and trial
WARMUP = 10  # steps before the first trial, run with the first count
# a single stream's windows split well across two threads from here (on an idle 2-core machine
# at 256 units: the default config and d2l-gru; docs/BENCHMARKS.md, CPU threads)
STREAM_HIDDEN = 256


class ThreadChooser:
    def __init__(self, counts: tuple[int, ...], period: int = PERIOD, trial: int = TRIAL,
                 clock=time.perf_counter, warmup: int = WARMUP):
        self.counts = tuple(dict.fromkeys(counts))  # distinct, first one first
        self.period, self.trial, self.clock, self.warmup = period, trial, clock, warmup
        self.best = self.counts[0]
        self.seen = 0  # steps run through this chooser
        self._times: dict[int, list[float]] = {c: [] for c in self.counts}

    @classmethod
    def of(cls, requested: int, hidden: int, rows: int, on_cpu: bool) -> "ThreadChooser | None":
        """The chooser for a run (None on CUDA): --threads N or a tiny model fix the count."""
        if not on_cpu:
            return None
        most = threads_for("train", hidden, rows, requested)
        fixed = requested > 0 or most == 1
        return cls((most,) if fixed else (most, 1))

    @classmethod
    def for_stream(cls, device, hidden: int, requested: int = 0) -> "ThreadChooser | None":
        """The chooser for one stream's windows (eval perplexity's exact pass, dynamic
        evaluation) on `device`: None off the CPU; `requested` > 0 (--threads) fixes the count;
        one thread under STREAM_HIDDEN units, whose per-character products are too small to
        split; else the two counts, timed."""
        if torch.device(device).type != "cpu":
            return None
        if requested > 0 or hidden < STREAM_HIDDEN:
            return cls((requested or 1,))
        return cls((threads_for("train", hidden, SMALL_WORK), 1))  # one per core, and one

    def current(self) -> tuple[int, bool]:
        """The thread count for the coming step, and whether that step is timed."""
        if len(self.counts) == 1 or self.seen < self.warmup:
            return self.counts[0], False
        at = (self.seen - self.warmup) % self.period
        per = self.trial + 1
        if at < per * len(self.counts):
            return self.counts[at // per], at % per != 0
        return self.best, False

    @contextmanager
    def step(self):
        """Run one training step with the chosen count (timing it during a trial)."""
        count, timed = self.current()
        use_threads(count)
        began = self.clock() if timed else 0.0
        yield
        if timed:
            self._times[count].append(self.clock() - began)
            if all(len(t) == self.trial for t in self._times.values()):
                self.best = min(self.counts, key=lambda c: statistics.median(self._times[c]))
                self._times = {c: [] for c in self.counts}
        self.seen += 1
