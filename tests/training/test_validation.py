"""One validation figure: the end of a run scores best.pt exactly as `charlm eval perplexity`
does, and the periodic figures say they are estimates (live line, metrics.jsonl, summary)."""

from __future__ import annotations

import json
import math

import pytest

from charlm.artifacts.rundir import read_metrics
from helpers import TINY, invoke, pydoc_text

pytestmark = pytest.mark.usefixtures("one_thread")


def train(tmp_path, monkeypatch, *extra: str, name: str = "run", text: str | None = None):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    corpus = tmp_path / "small.txt"
    if text is None:
        pydoc_text(corpus, 8000)
    else:
        corpus.write_text(text, encoding="utf-8")
    run = tmp_path / name
    result = invoke("train", "--text", str(corpus), *TINY, "--eval-tokens", "300", *extra,
                    "--out", str(run), "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def evaluated(*args: str) -> dict:
    result = invoke("eval", "perplexity", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["raw", "ema"])
def test_the_summary_figure_is_what_eval_perplexity_prints_for_best_pt(tmp_path, monkeypatch,
                                                                        extra):
    """Before, the summary's figure came from --batch-size streams over part of the split under
    autocast, and never matched `eval perplexity` (3.5943 against 3.5677)."""
    run, summary = train(tmp_path, monkeypatch, *extra)
    assert summary["val_checkpoint"] == str(run / "best.pt")
    for target in (str(run), str(run / "best.pt")):  # a run directory means its best.pt
        figures = evaluated("--checkpoint", target)
        assert figures["checkpoint"] == str(run / "best.pt")
        assert summary["val_ppl"] == pytest.approx(figures["perplexity"], abs=1e-6)
        assert summary["val_bpc"] == pytest.approx(figures["bits_per_char"], abs=1e-6)
        assert summary["val_loss"] == pytest.approx(figures["nats_per_char"], abs=1e-6)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert [(r["step"], r["val_kind"], r.get("checkpoint")) for r in rows] == [
        (10, "estimate", None), (20, "estimate", None), (20, "exact", "best.pt")]
    assert rows[-1]["loss"] == summary["val_loss"] and rows[-1]["characters"] == figures[
        "characters"]
    assert summary["best_val_loss_estimate"] == min(r["loss"] for r in rows[:2])
    assert "best_val_ppl" not in summary and "final_val_loss" not in summary


def test_the_live_lines_say_estimate_and_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    corpus = pydoc_text(tmp_path / "small.txt", 8000)
    result = invoke("train", "--text", str(corpus), *TINY[:-1], "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    val = [line for line in result.stderr.splitlines() if line.startswith("[step ")]
    assert [line.split(" val ppl ")[0] for line in val] == ["[step 10]", "[step 20]", "[step 20]"]
    assert all(line.endswith(("(estimate)", "(estimate, best so far)")) for line in val[:2])
    assert val[2].endswith("bits/char (exact: best.pt, all 799 characters of the validation "
                           "split, one stream, float32)")


MIXED = ("Grüße aus Köln, 東京 und Zürich: naïve café, ½ € — " * 200)


def test_a_byte_level_run_reports_bits_per_byte_and_per_character(tmp_path, monkeypatch):
    """A byte is not a character: 6.56 bits/byte was shown as bits/char. The figures per
    character divide the same nats by the characters the bytes decode to."""
    run, summary = train(tmp_path, monkeypatch, "--preprocessing", "bytes", text=MIXED)
    figures = evaluated("--checkpoint", str(run))
    val = (MIXED.encode("utf-8"))[-figures["bytes"] - 1:]  # the validation split's bytes
    assert figures["unit"] == "byte" and figures["characters"] == len(val[1:].decode("utf-8"))
    nats = figures["bits_per_byte"] * math.log(2) * figures["bytes"]
    assert figures["bits_per_char"] == pytest.approx(nats / figures["characters"] / math.log(2))
    assert figures["bits_per_char"] > figures["bits_per_byte"] * 1.1  # mixed text: ~1.3 bytes
    assert summary["val_bits_per_byte"] == pytest.approx(figures["bits_per_byte"], abs=1e-6)
    assert summary["val_bpc"] == pytest.approx(figures["bits_per_char"], abs=1e-6)
    assert summary["best_val_bits_per_byte_estimate"] is not None
    assert "best_val_bpc_estimate" not in summary
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert all(r["bpc"] > r["bits_per_byte"] * 1.1 for r in rows)
    table = invoke("eval", "perplexity", "--checkpoint", str(run)).stdout
    assert f"bits / byte {figures['bits_per_byte']:.4f}" in " ".join(table.replace("│", " ").split())


def test_a_run_continued_past_its_end_trains_as_an_uninterrupted_one(tmp_path):
    """The end's exact pass builds best.pt's model, which draws initial weights from torch's
    generator: last.pt must hold the generator as the last step left it, or the dropout masks
    of a run continued with --resume --max-steps differ from an uninterrupted run's."""
    import torch

    from charlm.artifacts.checkpoint import load_checkpoint
    from charlm.config.build import build_config
    from charlm.training.state import resolve_resume
    from charlm.training.trainer import Trainer

    text = pydoc_text(tmp_path / "small.txt", 8000)

    def config(out, steps):
        return build_config({}, dict(text=[str(text)], hidden=16, layers=2, embed=8,
                                     dropout=0.3, batch_size=4, num_steps=8, max_steps=steps,
                                     time_budget="0", eval_every=4, checkpoint_every=4,
                                     sample_length=5, impl="fused", out=str(out)))

    Trainer(config(tmp_path / "full", 8)).run()
    Trainer(config(tmp_path / "part", 4)).run()
    again, resumed = resolve_resume({"max_steps": 8}, str(tmp_path / "part"))
    Trainer(again, resume=resumed).run()
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_byte_level_models_dynamic_figures_are_in_the_same_units(tmp_path, monkeypatch):
    """--dynamic's figures per character divide by the same characters as the static ones, so
    the gain compares like with like (bytes and characters apart)."""
    run, _ = train(tmp_path, monkeypatch, "--preprocessing", "bytes", text=MIXED)
    figures = evaluated("--checkpoint", str(run), "--dynamic", "--dynamic-lr", "0")
    dynamic = figures["dynamic"]
    assert (dynamic["unit"], dynamic["bytes"], dynamic["characters"]) == (
        "byte", figures["bytes"], figures["characters"])
    assert dynamic["bits_per_char"] == pytest.approx(figures["bits_per_char"], rel=1e-5)
    assert figures["dynamic"]["gain_nats_per_char"] == pytest.approx(0, abs=1e-5)
