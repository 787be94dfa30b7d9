"""What a run that diverged leaves behind, said in one clause of its error line.

A loss that turns NaN or infinite stops the run (Trainer._check_finite), and non-finite
weights are never saved (Trainer.save): best.pt and last.pt, where they exist, hold the
weights of an earlier step. Each is checked as `charlm generate` would load it, so that the
line also names a file an older charlm (or an earlier, resumed run) wrote with NaN weights.
"""

from __future__ import annotations

from pathlib import Path

from charlm.artifacts.checkpoint import load_checkpoint
from charlm.artifacts.fields import MAX_MAGNITUDE, check_fields
from charlm.errors import CharlmError

NAMES = ("last.pt", "best.pt")


def checkpoints_left(run_dir: Path) -> str:
    """'good checkpoints: .../last.pt (step 10), .../best.pt (step 10)', the damaged ones named
    as such; or 'no checkpoint was saved before it diverged'."""
    good, bad = [], []
    for name in NAMES:
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            good.append(f"{path} (step {load_checkpoint(path).get('step')})")
        except CharlmError:
            bad.append(str(path))
    if not good and not bad:
        return "no checkpoint was saved before it diverged"
    said = [f"good checkpoint{'s' if len(good) > 1 else ''}: {', '.join(good)}"] if good else \
        ["no good checkpoint"]
    if bad:
        said.append(f"{' and '.join(bad)} hold{'s' if len(bad) == 1 else ''} damaged or "
                    "non-finite weights: do not use")
    return "; ".join(said)


def unsavable(state: dict, path: Path, step: int) -> str | None:
    """Why the checkpoint `state` must not be written to `path` (weights that diverged: NaN,
    infinite or beyond what the loader accepts), else None. A run saves only what charlm
    would load again, as best.pt or as last.pt."""
    try:
        check_fields(state, path)
    except CharlmError:
        return (f"the weights diverged by step {step} (NaN, infinite or beyond "
                f"{MAX_MAGNITUDE:g}: not saved)")
    return None
