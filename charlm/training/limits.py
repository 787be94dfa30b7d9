"""When a run stops: the first of --max-steps, --epochs and --time-budget it reaches (0: off).

    fraction_done()   how far along the run is, 0..1, by the limit closest to stopping it; the
                      cosine schedule decays over it, the progress bar fills with it
    reached()         "max_steps 500" (the limit, as the summary's stopped_by says it), or None
"""

from __future__ import annotations

from dataclasses import dataclass

from charlm.training.config import TrainConfig, parse_duration


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
