"""`charlm eval perplexity`: exact (equal to a plain per-character loop, state carried), the same
whatever --chunk, honest about <unk>, and one-line errors. Real checkpoints from tiny runs of
the real trainer, made once for this module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint
from charlm.cli.app import app
from charlm.config.train import DATA
from charlm.config.build import build_config
from charlm.data.dataset import load_dataset
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from charlm.data.text import preprocess
from charlm.data.vocab import Vocab
from helpers import invoke, train_runs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """`lstm`: 2-layer LSTM, d2l text, a 10% test split; `gru`: 1-layer GRU, raw text, no test split
    (trained last, so `latest` points at it)."""
    return train_runs(tmp_path_factory.mktemp("eval"), {
        "lstm": ["--embed", "8", "--cell", "lstm", "--layers", "2", "--preprocessing", "d2l",
                 "--test-fraction", "0.1"],
        "gru-scratch": ["--embed", "8", "--cell", "gru", "--layers", "2", "--impl", "scratch"],
        "gru": ["--embed", "8", "--cell", "gru", "--layers", "1"],  # last: the latest run
    })


@pytest.fixture(autouse=True)
def runs_env(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["root"] / "runs"))


def evaluate(*args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", "perplexity", *args, "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def load(run_dir: Path):
    ckpt = load_checkpoint(run_dir / "best.pt")
    model = CharLM(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), Vocab.from_dict(ckpt["vocab"]), ckpt


def split_of(run_dir: Path, split: str) -> torch.Tensor:
    _, _, ckpt = load(run_dir)
    cfg = build_config(ckpt["train_config"], {})
    return getattr(load_dataset(**cfg.section(DATA), vocab=ckpt["vocab"]), split)


@torch.no_grad()
def reference(model, ids: list[int]) -> tuple[float, int]:
    """Summed -log p (float64) of each character given all before it: one character at a time."""
    total, state = 0.0, None
    for t in range(len(ids) - 1):
        logits, state = model(torch.tensor([[ids[t]]]), state)
        total -= F.log_softmax(logits[0, 0].double(), -1)[ids[t + 1]].item()
    return total, len(ids) - 1


def assert_matches(report: dict, nll: float, count: int) -> None:
    nats = nll / count
    assert report["characters"] == count
    assert report["nats_per_char"] == pytest.approx(nats, rel=1e-6)
    assert report["bits_per_char"] == pytest.approx(nats / math.log(2), rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(nats), rel=1e-5)


# --- exactness -----------------------------------------------------------------------------------


def test_validation_perplexity_equals_a_per_character_loop(runs):
    model, _, _ = load(runs["gru"])
    val = split_of(runs["gru"], "val").tolist()
    report = evaluate("--checkpoint", str(runs["gru"]))
    assert_matches(report, *reference(model, val))
    assert report["split"] == "val" and report["text"] is None
    assert report["checkpoint"] == str(runs["gru"] / "best.pt")
    assert (report["unk_characters"], report["unk_share"]) == (0, 0.0)
    latest = evaluate()  # the latest run (gru) is the default
    assert Path(latest.pop("checkpoint")).resolve() == Path(report.pop("checkpoint")).resolve()
    assert latest == report


def test_test_split_of_a_two_layer_lstm(runs):
    model, _, _ = load(runs["lstm"])
    test = split_of(runs["lstm"], "test").tolist()
    assert len(test) == load(runs["lstm"])[2]["corpus"]["splits"]["test"] > 500
    report = evaluate("--checkpoint", str(runs["lstm"]), "--split", "test")
    assert_matches(report, *reference(model, test))
    assert report["split"] == "test"


def test_chunk_does_not_change_the_result(runs):
    reports = [evaluate("--checkpoint", str(runs["lstm"]), "--chunk", b) for b in ("1", "3", "7")]
    for r in reports[1:]:
        for key in ("perplexity", "nats_per_char", "bits_per_char"):
            assert r[key] == pytest.approx(reports[0][key], rel=1e-6)
        assert r["characters"] == reports[0]["characters"]


@pytest.mark.slow
@pytest.mark.parametrize("run, trained_with, impl", [
    ("gru", "fast", "fused"), ("gru", "fast", "scratch"), ("gru-scratch", "scratch", "fused"),
    ("gru-scratch", "scratch", "fast"), ("lstm", "fused", "scratch")])
def test_other_implementations_agree(runs, run, trained_with, impl):
    """A model trained with one implementation evaluates the same when loaded with another."""
    base = evaluate("--checkpoint", str(runs[run]), "--split", "train")
    assert base["impl"] == trained_with
    other = evaluate("--checkpoint", str(runs[run]), "--split", "train", "--impl", impl)
    assert other["impl"] == impl
    assert other["perplexity"] == pytest.approx(base["perplexity"], rel=1e-6)
    assert other["characters"] == base["characters"] == split_of(runs[run], "train").numel() - 1


def test_a_text_file_with_unseen_characters(runs, tmp_path):
    model, vocab, _ = load(runs["gru"])
    text = "Caf\u00e9 au lait \u2603 costs \u20ac3.\nThe caf\u00e9 is open."
    unseen = [c for c in text if c not in vocab]
    assert sorted(set(unseen)) == ["\u00e9", "\u20ac", "\u2603"]
    path = tmp_path / "cafe.txt"
    path.write_text(text, encoding="utf-8")
    report = evaluate("--checkpoint", str(runs["gru"]), "--text", str(path))
    ids = [vocab.index(c) for c in text]
    assert_matches(report, *reference(model, ids))
    # every character but the first is predicted; 4 of those are <unk> (none is the first)
    assert report["characters"] == len(text) - 1
    assert report["unk_characters"] == 4
    assert report["unk_share"] == 4 / (len(text) - 1)
    assert (report["split"], report["text"]) == (None, str(path))


def test_a_text_file_gets_the_checkpoints_preprocessing(runs, tmp_path):
    model, vocab, _ = load(runs["lstm"])  # d2l: letters and single spaces, lowercased
    path = tmp_path / "tm.txt"
    path.write_text("The Time Traveller (for so it will be convenient to speak of him)\n", "utf-8")
    report = evaluate("--checkpoint", str(runs["lstm"]), "--text", str(path))
    text = preprocess(path.read_text("utf-8"), "d2l")
    assert text == "the time traveller for so it will be convenient to speak of him "
    assert_matches(report, *reference(model, [vocab.index(c) for c in text]))


def test_table_output(runs):
    report = evaluate("--checkpoint", str(runs["gru"]))
    result = CliRunner().invoke(app, ["eval", "perplexity", "--checkpoint", str(runs["gru"])])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for label, value in (("perplexity", f"{report['perplexity']:.4f}"),
                         ("bits / char", f"{report['bits_per_char']:.4f}"),
                         ("characters evaluated", f"{report['characters']:,}"),
                         ("<unk> share", "0.0000% (0)")):
        assert any(label in line and value in line for line in lines), (label, value)


# --- errors --------------------------------------------------------------------------------------


def fail(*args: str):
    result = invoke("eval", "perplexity", *args, "-q")
    return result.exit_code, result.stdout, result.stderr


def test_empty_or_too_short_text(runs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert fail("--text", str(empty)) == (
        1, "", f"charlm: error: --text {empty} is empty: nothing to evaluate; give a file of at "
               "least 2 characters\n")
    one = tmp_path / "one.txt"
    one.write_text("!!!", encoding="utf-8")  # d2l preprocessing leaves one space
    assert fail("--checkpoint", str(runs["lstm"]), "--text", str(one)) == (
        1, "", f"charlm: error: --text {one} has 1 character after preprocessing: nothing to "
               "evaluate (a character is predicted from the ones before it, so at least 2 are "
               "needed)\n")
    missing = tmp_path / "missing.txt"
    assert fail("--text", str(missing)) == (
        1, "", f"charlm: error: --text {missing} does not exist; check the path\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    assert fail("--text", str(binary)) == (
        1, "", f"charlm: error: --text {binary} is not UTF-8 text (it holds NUL bytes, like a "
               "binary or UTF-16 file); give a UTF-8 text file\n")


def test_option_errors(runs, tmp_path):
    assert fail("--split", "val", "--text", "x.txt") == (
        2, "", "charlm: error: give --split or --text, not both\n")
    assert fail("--split", "dev") == (
        2, "", "charlm: error: --split must be one of train, val, test; got 'dev'\n")
    assert fail("--chunk", "0") == (2, "", "charlm: error: --chunk must be >= 1, got 0\n")
    assert fail("--checkpoint", str(runs["lstm"]), "--impl", "fast") == (
        2, "", "charlm: error: --impl fast exists only for gru, mingru, minlstm, not lstm; use "
               "--impl fused or --impl scratch\n")


def test_damaged_checkpoints_are_refused_before_use(runs, tmp_path):
    _, _, ckpt = load(runs["gru"])
    bad = tmp_path / "bad.pt"
    save_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], "hidden": 17}}, bad)
    assert fail("--checkpoint", str(bad)) == (
        1, "", f"charlm: error: {bad}: parameter rnn.weight_ih_l0 is (48, 8) but its model config "
               "gives (51, 8); the file is damaged\n")
    vocab = {**ckpt["vocab"], "tokens": ckpt["vocab"]["tokens"][:-1], "counts": []}
    save_checkpoint({**ckpt, "vocab": vocab}, bad)
    size = len(ckpt["vocab"]["tokens"])
    assert fail("--checkpoint", str(bad)) == (
        1, "", f"charlm: error: {bad}: its vocabulary has {size - 1} tokens but its model config "
               f"says {size}; the file is damaged\n")
    state = {k: v for k, v in ckpt["model"].items() if k != "head.bias"}
    save_checkpoint({**ckpt, "model": state}, bad)
    assert fail("--checkpoint", str(bad)) == (
        1, "", f"charlm: error: {bad}: its parameters do not match its model config (missing "
               "head.bias); the file is damaged\n")


def test_changed_corpus_is_refused(runs, tmp_path):
    _, _, ckpt = load(runs["gru"])
    moved = tmp_path / "moved.pt"
    save_checkpoint({**ckpt, "corpus": {**ckpt["corpus"], "num_tokens": 5999}}, moved)
    assert fail("--checkpoint", str(moved)) == (
        1, "", f"charlm: error: the corpus now has 6000 tokens but {moved} was trained on 5999; "
               "the text changed since training, so its splits cannot be rebuilt: evaluate a "
               "file with --text FILE\n")


@pytest.mark.slow
def test_subprocess_split_of_size_zero(runs):
    env = {**os.environ, "CHARLM_RUNS_DIR": str(runs["root"] / "runs"), "OMP_NUM_THREADS": "1"}
    env.pop("CHARLM_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "charlm", "eval", "perplexity", "--split", "test",
                        "-q"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (
        1, "", f"charlm: error: the run of {runs['gru'] / 'best.pt'} held out no test split "
               "(test_fraction 0): train with --test-fraction 0.1 (for example) to get one, or "
               "evaluate a file with --text FILE\n")


def test_no_runs_yet(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "none"))
    assert fail() == (
        1, "", f"charlm: error: no runs yet in {tmp_path / 'none'}/: train one first with "
               "`charlm train`, or pass --checkpoint PATH\n")


def loud_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose output weights are of magnitude 1e5 (within what a checkpoint
    may hold): its loss is tens of thousands of nats, whose exp overflows float64."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = torch.load(tiny_run / "run" / "last.pt", weights_only=True)
    head = ckpt["model"]["head.weight"]
    loud = torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 1e5
    ckpt["model"]["head.weight"] = loud
    ckpt["best_val_loss"] = math.inf
    torch.save(ckpt, run / "last.pt")
    return run


def test_a_loss_past_floats_range_is_an_infinite_perplexity_not_a_crash(tiny_run, tmp_path):
    run = loud_run(tiny_run, tmp_path)
    result = invoke("eval", "perplexity", "--checkpoint", str(run / "last.pt"), "--text",
                    str(tiny_run / "small.txt"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["nats_per_char"] > 1000 and payload["perplexity"] == math.inf
    plain = invoke("eval", "perplexity", "--checkpoint", str(run / "last.pt"), "--text",
                   str(tiny_run / "small.txt"))
    row = next(line for line in plain.stdout.splitlines() if "perplexity " in line)
    assert plain.exit_code == 0 and row.split("│")[2].strip() == "inf", plain.stdout
