"""What a test may not touch: the repository tree and the user's runs.

Every test gets its own CHARLM_RUNS_DIR, CHARLM_DATA_DIR and (per session) CHARLM_KERNEL_DIR
(conftest.py), and `charlm` processes a test starts inherit them, whatever their cwd. This
module is the check behind that promise: the repository's state is taken when the session starts
and again when it ends, and any difference fails the session (conftest.pytest_sessionfinish).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Written by Python and pytest themselves, not by a test.
_NOT_OURS = ("__pycache__", ".pytest_cache")
# Ignored folders a stray test would write into; their contents are listed file by file.
_WALKED = ("runs", "data")


def _entry(path: Path) -> tuple:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return ("missing",)
    if path.is_symlink():
        return ("link", os.readlink(path), st.st_mtime_ns)
    return ("dir",) if path.is_dir() else ("file", st.st_size, st.st_mtime_ns)


def tree_state(repo: Path) -> dict[str, tuple]:
    """Every untracked or ignored path `git status --porcelain --ignored` names (ignored ones
    with type, size and mtime), and every path under runs/ and data/ (ignored, so git names the
    folder only): equal states mean no test created, deleted, rewrote or repointed a file that
    is not under version control."""
    state: dict[str, tuple] = {}
    try:
        listing = subprocess.run(["git", "status", "--porcelain", "--ignored", "-z"], cwd=repo,
                                 capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an unpacked sdist)
        listing = ""
    for item in listing.split("\0"):
        name = item[3:].rstrip("/")
        # Untracked and ignored paths only: a developer edits and commits tracked files while the
        # suite runs, and may write a new file (its presence counts, not its mtime); ignored
        # files are written by programs alone.
        if item[:2] in ("??", "!!") and not any(part in _NOT_OURS for part in Path(name).parts):
            state[f"{item[:2]} {name}"] = _entry(repo / name) if item[:2] == "!!" else ()
    for top in _WALKED:
        root = repo / top
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            rel = path.relative_to(repo)
            if not any(part in _NOT_OURS for part in rel.parts):
                state[str(rel)] = _entry(path)
    return state


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What differs between two tree_state()s, one line per path."""
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            was, now = before.get(key, ("absent",)), after.get(key, ("absent",))
            lines.append(f"{key}: {was} -> {now}")
    return lines
