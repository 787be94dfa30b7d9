"""`charlm train --tensorboard [DIR]`: the event files, read back with TensorBoard's own reader,
hold the run's metrics.jsonl rows as scalars and its samples as text; a resumed run replaces what
was logged past its checkpoint; a missing extra is one line before any work."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'charlm-rnn[tensorboard]'")

from charlm.cli.train import bare_values  # noqa: E402
from charlm.artifacts.rundir import read_metrics  # noqa: E402
from helpers import TINY, pydoc_text, run_main, train_runs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return reader


def scalars(reader, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in reader.Scalars(tag)]


def texts(reader, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in reader.Tensors(f"{tag}/text_summary")]


def approx_rows(rows: list[dict], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    return [(r["step"], pytest.approx(r[key] * scale, rel=1e-6)) for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    return train_runs(tmp_path_factory.mktemp("tb"), {
        "board": ["--layers", "1", "--tensorboard"],  # alone, before --out: RUN_DIR/tensorboard
        "clip0": ["--layers", "1", "--clip", "0"],
    })


def test_the_event_files_hold_the_metrics_and_the_samples(runs):
    run = runs["board"]
    reader = events(run / "tensorboard")
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in train] == [5, 10, 15, 20] and [r["step"] for r in val] == [10, 20, 20]
    assert scalars(reader, "loss/train") == approx_rows(train, "loss")
    assert scalars(reader, "perplexity/train") == approx_rows(train, "ppl")
    assert scalars(reader, "bits_per_char/train") == approx_rows(train, "loss", 1 / math.log(2))
    assert scalars(reader, "learning_rate") == approx_rows(train, "lr")
    assert scalars(reader, "tokens_per_s") == approx_rows(train, "tokens_per_s")
    assert scalars(reader, "grad_norm") == approx_rows(train, "grad_norm")
    assert all(r["grad_norm"] > 0 for r in train)
    estimates = [r for r in val if r["val_kind"] == "estimate"]
    [exact] = [r for r in val if r["val_kind"] == "exact"]
    for kind, rows in (("estimate", estimates), ("exact", [exact])):
        assert scalars(reader, f"loss/val_{kind}") == approx_rows(rows, "loss")
        assert scalars(reader, f"perplexity/val_{kind}") == approx_rows(rows, "ppl")
        assert scalars(reader, f"bits_per_char/val_{kind}") == approx_rows(rows, "bpc")
    samples = (run / "samples.txt").read_text(encoding="utf-8").split("--- step ")[1:]
    expected = []
    for block in samples:
        step, text = block.split("\n", 1)
        expected.append((int(step), "\n".join("    " + line for line in text[:-1].split("\n"))))
    assert texts(reader, "sample") == expected
    [(step, config)] = texts(reader, "config")
    assert step == 0 and '    tensorboard = "RUN_DIR/tensorboard"' in config.splitlines()
    assert 'tensorboard = "RUN_DIR/tensorboard"' in (run / "config.toml").read_text()


def test_clip_0_logs_the_norm_without_changing_training(runs, tmp_path):
    """--clip 0 measures the gradient norm only for the log: the weights are the ones trained
    without --tensorboard, bit for bit; DIR may be any folder."""
    made = train_runs(tmp_path, {"clip0": ["--layers", "1", "--clip", "0", "--tensorboard",
                                           str(tmp_path / "logs")]})
    ours = torch.load(made["clip0"] / "last.pt", weights_only=True)["model"]
    plain = torch.load(runs["clip0"] / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    assert "grad_norm" not in read_metrics(runs["clip0"] / "metrics.jsonl")[0]
    norms = scalars(events(tmp_path / "logs"), "grad_norm")
    assert [s for s, _ in norms] == [5, 10, 15, 20] and all(v > 0 for _, v in norms)


def test_a_resumed_run_replaces_what_was_logged_past_its_checkpoint(tmp_path, monkeypatch):
    made = train_runs(tmp_path, {"run": ["--layers", "1", "--max-steps", "10", "--tensorboard"]})
    run = made["run"]
    shutil.copy(run / "last.pt", tmp_path / "step10.pt")
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    for _ in range(2):  # the second time, from step 10 again: as after a crash at step 20
        assert run_main(["train", "--resume", str(run), "--max-steps", "20", "-q"])[0] == 0
        shutil.copy(tmp_path / "step10.pt", run / "last.pt")
    reader = events(run / "tensorboard")
    train = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert scalars(reader, "loss/train") == approx_rows(train, "loss")
    # (TensorBoard's reader purges scalars, not text: the samples are not checked here)
    assert [s for s, _ in texts(reader, "config")] == [0]  # written by the fresh run only


def test_a_missing_extra_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = tmp_path / "small.txt"
    text.write_text("some text to train on " * 50)
    assert run_main(["train", "--text", str(text), "--tensorboard", "--out", str(tmp_path / "r")]) == (
        1, "", "charlm: error: --tensorboard needs the tensorboard package: install the "
               "tensorboard extra with pip install 'charlm-rnn[tensorboard]' (or log nothing: "
               "--tensorboard off)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]  # no run, no runs/
    code, _, err = run_main(["train", "--text", str(text), "--tensorboard", "off", "--max-steps",
                             "2", "--hidden", "8", "--batch-size", "2", "--num-steps", "8", "-q",
                             "--out", str(tmp_path / "r")])
    assert (code, err) == (0, "")
    assert not (tmp_path / "r" / "tensorboard").exists() and not (tmp_path / "r" / "off").exists()


def test_a_tensorboard_dir_that_cannot_be_made_leaves_no_run(tmp_path, monkeypatch):
    """A --tensorboard DIR under a regular file is one line, before the run directory, its
    config.toml, metrics.jsonl and lock, or runs/latest are written."""
    from charlm.artifacts import rundir

    runs = tmp_path / "runs"
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs))
    (runs / "earlier").mkdir(parents=True)
    rundir.point_latest(runs / "earlier")
    latest = (runs / "latest").read_bytes()
    (tmp_path / "file").write_text("not a folder")
    text = pydoc_text(tmp_path / "small.txt", 6000)
    board = tmp_path / "file" / "tb"
    for out in ([], ["--out", str(tmp_path / "run")]):  # the default run directory, and --out
        assert run_main(["train", "--text", str(text), *TINY, "--tensorboard", str(board), *out]) \
            == (1, "", f"charlm: error: cannot write TensorBoard logs in {board}: Not a "
                       "directory; choose another --tensorboard DIR\n")
        assert sorted(p.name for p in runs.iterdir()) == ["earlier", "latest"]
        assert (runs / "latest").read_bytes() == latest and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    (["--tensorboard"], ["--tensorboard=RUN_DIR/tensorboard"]),
    (["--tensorboard", "-q"], ["--tensorboard=RUN_DIR/tensorboard", "-q"]),
    (["--tensorboard", "logs", "-q"], ["--tensorboard", "logs", "-q"]),
    (["--tensorboard=logs"], ["--tensorboard=logs"]),
    (["--", "--tensorboard"], ["--", "--tensorboard"]),
])
def test_tensorboard_alone_takes_its_bare_value(args, expected):
    assert bare_values(args) == expected


def test_the_option_is_in_help_and_in_a_config_file(tmp_path):
    code, out, _ = run_main(["train", "--help"])
    assert code == 0 and "--tensorboard [DIR]" in out
    from charlm.config.build import build_config
    from charlm.config.file import load_config_file

    (tmp_path / "c.toml").write_text('[run]\ntensorboard = "RUN_DIR/tb"\n')
    assert build_config(load_config_file(tmp_path / "c.toml"), {}).tensorboard == "RUN_DIR/tb"
    from charlm.training.tensorboard import log_dir

    assert log_dir("RUN_DIR/tb", Path("runs/x")) == Path("runs/x/tb")
    assert log_dir("/tmp/logs", Path("runs/x")) == Path("/tmp/logs")
