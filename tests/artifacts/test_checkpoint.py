"""Checkpoint files: plain data written atomically, read safely, found by run directory or
`runs/latest`, and turned back into the model that was trained (one loader for every command)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from charlm.errors import CharlmError
from charlm.artifacts.checkpoint import (FORMAT, FORMAT_VERSION, find_checkpoint, load_checkpoint,
                                        save_checkpoint)
from charlm.inference.loading import load_model
from charlm.artifacts.rundir import latest_run, point_latest

pytestmark = pytest.mark.usefixtures("one_thread")


def plain(tiny_run: Path) -> dict:
    return torch.load(tiny_run / "run" / "last.pt", weights_only=True)


def test_a_saved_payload_loads_back_equal_and_stamped(tiny_run, tmp_path):
    data = plain(tiny_run)
    path = save_checkpoint({k: v for k, v in data.items() if k not in ("format", "version")},
                           tmp_path / "copy.pt")
    again = load_checkpoint(path)
    assert (again["format"], again["version"]) == (FORMAT, FORMAT_VERSION)
    assert again.keys() == data.keys()
    for name, weight in data["model"].items():
        assert torch.equal(again["model"][name], weight), name
    assert again["train_config"] == data["train_config"]
    assert again["iterator"] == data["iterator"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_non_checkpoint_and_tampered_files_are_refused(tmp_path, tiny_run):
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    with pytest.raises(CharlmError, match=r"is not a charlm checkpoint"):
        load_checkpoint(text)
    good = (tiny_run / "run" / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CharlmError, match=r"truncated or damaged"):
        load_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CharlmError, match=r"no 'charlm-checkpoint' header"):
        load_checkpoint(other)
    newer = tmp_path / "newer.pt"
    data = plain(tiny_run)
    data["version"] = 99
    torch.save(data, newer)
    with pytest.raises(CharlmError, match=r"format version 99, newer than this charlm reads \(1\)"):
        load_checkpoint(newer)


def test_a_run_directory_gives_best_then_last(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    assert find_checkpoint(run) == run / "best.pt"
    assert find_checkpoint(run, prefer="last.pt") == run / "last.pt"
    (run / "best.pt").unlink()
    assert find_checkpoint(run) == run / "last.pt"
    (run / "last.pt").unlink()
    with pytest.raises(CharlmError) as err:
        find_checkpoint(run)
    assert str(err.value) == f"run directory {run} holds no checkpoint (best.pt or last.pt)"
    with pytest.raises(CharlmError) as err:
        find_checkpoint(tmp_path / "nope")
    assert str(err.value) == f"checkpoint or run directory {tmp_path / 'nope'} does not exist"


def test_no_target_means_the_latest_run(tiny_run, tmp_path, isolated_runs):
    with pytest.raises(CharlmError) as err:
        find_checkpoint(None)
    assert str(err.value) == (f"no runs yet in {isolated_runs}/: train one first with `charlm train`, "
                              "or pass --checkpoint PATH")
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    point_latest(run)
    assert (isolated_runs / "latest").read_text() == f"{run.resolve()}\n"
    assert latest_run() == run.resolve()
    assert find_checkpoint(None) == run.resolve() / "best.pt"
    shutil.rmtree(run)  # a pointer to a deleted run is no run
    assert latest_run() is None


def test_a_dangling_latest_names_its_target_and_the_newest_run_there_is(tmp_path, isolated_runs):
    """runs/latest naming a deleted run is not 'no runs yet' when runs/ holds runs: the error
    names what latest pointed to and the newest run that is there."""
    import os

    older, newer = isolated_runs / "older", isolated_runs / "newer"
    for i, run in enumerate((older, newer, isolated_runs / "gone")):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("{}\n")
        os.utime(run / "metrics.jsonl", (1000 + i, 1000 + i))
    (older / "last.pt").write_bytes(b"")
    os.utime(older / "last.pt", (500, 500))  # older's newest file is still older than newer's
    point_latest(isolated_runs / "gone")
    shutil.rmtree(isolated_runs / "gone")
    gone = (isolated_runs / "gone").resolve()
    with pytest.raises(CharlmError) as err:
        find_checkpoint(None)
    assert str(err.value) == (f"{isolated_runs / 'latest'} names {gone}, which no longer exists; the "
                              f"newest run in {isolated_runs}/ is {newer}: pass --checkpoint PATH")
    (isolated_runs / "latest").unlink()
    with pytest.raises(CharlmError) as err:
        find_checkpoint(None)
    assert str(err.value) == (f"{isolated_runs / 'latest'} is missing; the newest run in {isolated_runs}/ "
                              f"is {newer}: pass --checkpoint PATH")
    point_latest(isolated_runs / "gone")
    shutil.rmtree(older)
    shutil.rmtree(newer)
    with pytest.raises(CharlmError) as err:
        find_checkpoint(None)
    assert str(err.value) == (f"{isolated_runs / 'latest'} names {gone}, which no longer exists, and "
                              f"{isolated_runs}/ holds no other run: train one with `charlm train`, or "
                              "pass --checkpoint PATH")


def test_load_model_rebuilds_the_trained_model_in_any_implementation(tiny_run):
    ckpt = plain(tiny_run)
    loaded = load_model(str(tiny_run / "run" / "last.pt"), None, "cpu")
    assert not loaded.model.training and loaded.model.config.impl == ckpt["model_config"]["impl"]
    assert loaded.vocab.tokens == ckpt["vocab"]["tokens"]
    assert loaded.preprocessing == ckpt["preprocessing"]
    tokens = torch.arange(30)[None] % len(loaded.vocab)
    with torch.no_grad():
        reference = loaded.model(tokens)[0]
        for impl in ("fused", "scratch", "fast"):
            other = load_model(str(tiny_run / "run"), impl, "cpu").model
            assert other.config.impl == impl
            assert torch.allclose(other(tokens)[0], reference, atol=1e-5), impl
