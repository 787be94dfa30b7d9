"""When a run stops: the first of --max-steps, --epochs and --time-budget it reaches (0: off).

    fraction_done()   how far along the run is, 0..1, by the limit closest to stopping it; the
                      cosine schedule decays over it, the progress bar fills with it
    eta()             seconds of training left until the first limit stops the run, at the pace
                      so far (the progress line's ETA)
    reached()         "max_steps 500" (the limit, as the summary's stopped_by says it), or None
    check_not_reached()  a resumed run that already reached a limit: which, and how to raise it
"""

from __future__ import annotations

from dataclasses import dataclass

from charlm.config.train import TrainConfig
from charlm.config.build import parse_duration
from charlm.errors import UsageError


@dataclass(frozen=True)
class Limits:
    max_steps: int
    epochs: int
    time_budget: float  # seconds
    budget_text: str  # as given, e.g. "2m"

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Limits":
        return cls(cfg.max_steps, cfg.epochs, parse_duration(cfg.time_budget), cfg.time_budget)

    def fraction_done(self, step: int, epochs_done: float, elapsed: float) -> float:
        parts = [0.0]
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.epochs:
            parts.append(epochs_done / self.epochs)
        if self.time_budget:
            parts.append(elapsed / self.time_budget)
        return min(max(parts), 1.0)

    def eta(self, step: int, epochs_done: float, elapsed: float) -> float | None:
        """Training seconds left until the first limit is reached: the budget's remainder, or
        the steps (epochs) to go at the pace so far; None with no limit or no pace yet."""
        left = []
        if self.time_budget:
            left.append(self.time_budget - elapsed)
        if self.max_steps and step:
            left.append((self.max_steps - step) * elapsed / step)
        if self.epochs and epochs_done:
            left.append((self.epochs - epochs_done) * elapsed / epochs_done)
        return max(min(left), 0.0) if left else None

    def describe(self) -> str:
        """'max_steps 5000 or time_budget 2m', or 'no limit (stop it with Ctrl-C)'."""
        parts = [f"max_steps {self.max_steps}"] if self.max_steps else []
        parts += [f"epochs {self.epochs}"] if self.epochs else []
        parts += [f"time_budget {self.budget_text}"] if self.time_budget else []
        return " or ".join(parts) if parts else "no limit (stop it with Ctrl-C)"

    def reached(self, step: int, epochs_done: float, elapsed: float) -> str | None:
        if self.max_steps and step >= self.max_steps:
            return f"max_steps {self.max_steps}"
        if self.epochs and epochs_done >= self.epochs:
            return f"epochs {self.epochs}"
        if self.time_budget and elapsed >= self.time_budget:
            return f"time_budget {self.budget_text}"
        return None

    def check_not_reached(self, step: int, epochs_done: float, elapsed: float,
                          resume: str) -> None:
        """Refuse to resume a run that already reached a limit (it would only evaluate and
        stop again); the message names the limit and the option that raises it, doubled, on
        `resume` (the command that resumes the run). Every rank of a run raises it alike."""
        done = self.reached(step, epochs_done, elapsed)
        if done is None:
            return
        if done.startswith("max_steps"):
            raised = f"--max-steps {2 * self.max_steps}"
        elif done.startswith("epochs"):
            raised = f"--epochs {2 * self.epochs}"
        else:
            raised = f"--time-budget {_duration(2 * self.time_budget)}"
        error = UsageError(f"the run already reached {done} (at step {step}); to train on, "
                           f"raise it: {resume} {raised}")
        error.on_every_rank = True  # rank 0 says it for all
        raise error


def _duration(seconds: float) -> str:
    """120 -> '2m', 7200 -> '2h', 90 -> '90s' (what --time-budget reads)."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
