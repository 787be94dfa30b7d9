"""What changes with corpus size: the in-training evaluation budget (--eval-tokens) and the
whole-split pass at the end, byte-level models end to end, and the warning for a vocabulary so
large that its layers dominate the run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from charlm.data.text import preprocess
from charlm.inference.evaluate import corpus_nll
from charlm.inference.loading import model_from_checkpoint
from charlm.artifacts.checkpoint import load_checkpoint
from helpers import TINY, pydoc_text, run_main

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_tokens_is_a_fixed_part_and_the_end_scores_the_whole_split_exactly(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = pydoc_text(tmp_path / "t.txt", 40_000)
    run = tmp_path / "run"
    code, out, err = run_main(["train", "--text", str(text), *TINY[:-1], "--eval-tokens", "700",
                               "--out", str(run)])
    assert code == 0, err
    assert ("train 36,000 / val 4,000 (estimates on the first 700, the exact figure on all of "
            "it at the end);") in err
    vals = [r for r in rows(run) if r["kind"] == "val"]
    assert [(r["step"], r["whole_split"], r["val_kind"]) for r in vals] == [
        (10, False, "estimate"), (20, False, "estimate"), (20, True, "exact")]
    assert all(r["eval_s"] >= 0 for r in vals)
    assert [line for line in err.splitlines() if "(exact: " in line] == [
        f"[step 20] val ppl {vals[2]['ppl']:.4f}, {vals[2]['bpc']:.4f} bits/char (exact: "
        "best.pt, all 3,999 characters of the validation split, one stream, float32)"]
    # recompute the figures independently: the estimate of the final model over the first 700
    # in 4 streams, the exact one of best.pt over all of the split in one
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    val = torch.tensor(model_vocab_ids(last, text)[36_000:])
    part = corpus_nll(model_from_checkpoint(last).model, val[:700], 4, 8)
    whole = corpus_nll(model_from_checkpoint(best).model, val, 1, 8)
    assert vals[1]["loss"] == pytest.approx(part[0] / part[1], rel=1e-6)
    assert vals[2]["loss"] == pytest.approx(whole[0] / whole[1], rel=1e-6)
    summary = [r for r in rows(run) if r["kind"] == "summary"][0]
    assert summary["val_loss"] == vals[2]["loss"]  # what the run reports: the exact figure
    assert summary["val_checkpoint"] == str(run / "best.pt")
    assert summary["best_val_loss_estimate"] == min(vals[0]["loss"], vals[1]["loss"])


def model_vocab_ids(ckpt: dict, path) -> list[int]:
    tokens = ckpt["vocab"]["tokens"]
    index = {t: i for i, t in enumerate(tokens)}
    return [index.get(c, 0) for c in preprocess(path.read_text("utf-8"), ckpt["preprocessing"])]


def test_eval_tokens_0_or_a_small_split_evaluate_everything_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = pydoc_text(tmp_path / "t.txt", 20_000)
    for name, budget in (("zero", "0"), ("big", "5000")):
        code, _, err = run_main(["train", "--text", str(text), *TINY, "--eval-tokens", budget,
                                 "--out", str(tmp_path / name)])
        assert code == 0, err
        vals = [r for r in rows(tmp_path / name) if r["kind"] == "val"]
        assert [(r["step"], r["val_kind"]) for r in vals] == [
            (10, "estimate"), (20, "estimate"), (20, "exact")]


@pytest.mark.slow
def test_a_large_vocabulary_is_named_in_the_first_line_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    rng = random.Random(0)
    cjk = [chr(0x4E00 + i) for i in range(1500)]
    text = tmp_path / "cjk.txt"
    text.write_text("".join(rng.choice(cjk) if rng.random() < 0.3 else rng.choice("ab cd\n")
                            for _ in range(30_000)), encoding="utf-8")
    base = ["train", "--text", str(text), *TINY, "--max-steps", "2", "--embed", "8"]
    code, _, err = run_main([*base, "--out", str(tmp_path / "a")])
    assert code == 0, err
    vocab = len(set(text.read_text("utf-8"))) + 1  # TINY: 2 GRU layers of 16, embedding 8
    assert err.splitlines()[0] == (
        f"charlm: warning: the vocabulary has {vocab:,} symbols: the layers over it cost "
        f"{16 * vocab / (3 * 16 * (8 + 16) + 3 * 16 * 32):.0f}x the recurrent layers per "
        "character, so "
        "they take most of the time of training and evaluation; --preprocessing bytes (at most "
        "256 symbols, any script) or --max-vocab N (the N most frequent; the rest become <unk>) "
        "make it small")
    for fix in (["--preprocessing", "bytes"], ["--max-vocab", "200"]):
        code, _, err = run_main([*base, *fix, "--out", str(tmp_path / fix[0][2:])])
        assert code == 0 and "warning" not in err, err


def test_a_byte_level_model_reads_and_writes_any_script(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = tmp_path / "multi.txt"
    words = ["Über", "große", "Flüsse", "日本語", "😀", "naïve", "the", "and"]
    rng = random.Random(1)
    text.write_text(" ".join(rng.choice(words) for _ in range(4000)), encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = run_main(["train", "--text", str(text), *TINY, "--preprocessing", "bytes",
                             "--out", str(run)])
    assert code == 0, err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["preprocessing"] == "bytes"
    assert {ord(t) for t in ckpt["vocab"]["tokens"][1:]} == set(range(1, 256))  # every byte
    seen = len(set(text.read_bytes()))  # the text's bytes first, by frequency
    assert {ord(t) for t in ckpt["vocab"]["tokens"][1 : 1 + seen]} == set(text.read_bytes())
    samples = (run / "samples.txt").read_text("utf-8")
    assert "\\x" not in samples and "Ã" not in samples  # decoded text, not byte soup
    args = ["generate", "--checkpoint", str(run), "--prefix", "Über", "--length", "80",
            "--seed", "5"]
    code, streamed, err = run_main(args)
    assert code == 0, err
    code, out, err = run_main([*args, "--json"])
    assert code == 0, err
    drawn = json.loads(out)
    assert drawn["prefix"] == "Über"
    # bytes drawn one at a time, shown as they complete UTF-8 sequences: the same text
    assert streamed == drawn["prefix"] + drawn["samples"][0] + "\n"
    code, out, err = run_main(["eval", "perplexity", "--checkpoint", str(run), "--json"])
    report = json.loads(out)
    val = text.read_bytes()[-round(0.1 * len(text.read_bytes())) + 1:]  # its targets
    assert code == 0 and report["bytes"] == len(val)
    assert report["characters"] == len(val.decode("utf-8", errors="replace"))
    assert math.isfinite(report["bits_per_char"])
