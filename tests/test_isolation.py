"""No test touches anything outside its temp folder: runs, the corpus cache and the compiled
kernels go to tmp paths for every test and for the `charlm` processes it starts from any cwd,
and the session fails when the repository tree changed (conftest.py, tests/isolation.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import isolation
from helpers import run_main

REPO = Path(__file__).resolve().parents[1]
HOME_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def test_runs_cache_and_kernels_are_in_the_tests_temp_folders(tmp_path):
    from charlm.artifacts.rundir import runs_root
    from charlm.data.corpus import cache_dir

    assert runs_root() == tmp_path / "runs"
    assert cache_dir() == tmp_path / "charlm-cache"
    kernels = Path(os.environ["CHARLM_KERNEL_DIR"])
    assert not kernels.is_relative_to(REPO) and not kernels.is_relative_to(HOME_CACHE)


@pytest.mark.slow
def test_a_charlm_process_started_at_the_repository_root_inherits_them(tmp_path):
    code = ("import json, os; from charlm.artifacts.rundir import runs_root; "
            "from charlm.data.corpus import cache_dir; "
            "print(json.dumps([str(runs_root().resolve()), str(cache_dir().resolve()), "
            "os.environ['CHARLM_KERNEL_DIR']]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    assert json.loads(done.stdout) == [str((tmp_path / "runs").resolve()),
                                       str((tmp_path / "charlm-cache").resolve()),
                                       os.environ["CHARLM_KERNEL_DIR"]]


def test_training_from_the_repository_root_leaves_runs_latest_alone(tmp_path, monkeypatch):
    """What a test that trained from the root without CHARLM_RUNS_DIR used to do: repoint the
    user's runs/latest at a tiny model in a pytest folder."""
    text = tmp_path / "small.txt"
    text.write_text("the time machine " * 400, encoding="utf-8")
    before = isolation.tree_state(REPO)
    monkeypatch.chdir(REPO)
    code, _, err = run_main(["train", "--text", str(text), "--hidden", "8", "--layers", "1",
                             "--batch-size", "4", "--num-steps", "8", "--max-steps", "2", "-q",
                             "--impl", "fused", "--out", str(tmp_path / "run")])
    assert (code, err) == (0, "")
    assert (tmp_path / "runs" / "latest").read_text(encoding="utf-8") == (
        f"{(tmp_path / 'run').resolve()}\n")
    assert isolation.changes(before, isolation.tree_state(REPO)) == []


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def test_the_tree_check_names_every_change_but_pythons_own_caches(tmp_path):
    repo = tmp_path / "repo"
    (repo / "runs" / "old").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("runs/\n__pycache__/\nbuild/\n")
    (repo / "runs" / "latest").write_text("/somewhere/runs/old\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "code.py", ".gitignore")
    _git(repo, "commit", "-q", "-m", "start")
    before = isolation.tree_state(repo)
    assert isolation.changes(before, isolation.tree_state(repo)) == []

    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "code.cpython-311.pyc").write_bytes(b"\0")
    assert isolation.changes(before, isolation.tree_state(repo)) == []

    latest = repo / "runs" / "latest"
    latest.write_text("/tmp/pytest-of-root/pytest-0/test_x0/run\n")
    os.utime(latest, ns=(1, 1))
    (repo / "runs" / "new").mkdir()
    (repo / "build").mkdir()
    (repo / "build" / "lib.so").write_bytes(b"")
    (repo / "code.py").write_text("x = 2\n")  # a developer's edit while the suite runs: allowed
    (repo / "curves.png").write_bytes(b"")
    changed = isolation.changes(before, isolation.tree_state(repo))
    assert [line.split(":")[0] for line in changed] == [
        "!! build", "?? curves.png", "runs/latest", "runs/new"]
    assert changed[2].startswith("runs/latest: ('file', 20, ") and ("('file', 41, 1)") in changed[2]
