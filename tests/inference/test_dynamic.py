"""Dynamic evaluation: learning rate 0 is the static figure, an update is Krause et al.'s rule
computed by hand, adapting pays on text that repeats, and `eval perplexity --dynamic` reports
both figures without touching the checkpoint."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from charlm.inference.dynamic import (EPS, DynamicSettings, adaptable, dynamic_perplexity, gradient_rms)
from charlm.inference.evaluate import perplexity_of
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from helpers import invoke, no_float64

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(impl: str = "fused", cell: str = "gru", **over) -> CharLM:
    torch.manual_seed(0)
    return CharLM(ModelConfig(vocab_size=12, cell=cell, hidden=10, layers=2, embed=6, impl=impl,
                              dropout=0.3, **over)).eval()


@pytest.mark.parametrize("impl, cell", [("fused", "gru"), ("fast", "gru"), ("scratch", "lstm")])
def test_learning_rate_zero_is_the_static_figure(impl, cell):
    model = model_of(impl, cell)
    tokens = torch.randint(12, (401,), generator=torch.Generator().manual_seed(1))
    copy = adaptable(model)
    rms = gradient_rms(copy, tokens, 20, 400)
    adapted = dynamic_perplexity(copy, tokens, DynamicSettings(lr=0.0, decay=0.02, window=20), rms)
    assert adapted == perplexity_of(model, tokens, window=20)  # every field, exactly
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), model.parameters()))


def test_an_update_is_krauses_rule_by_hand():
    model = model_of()
    tokens = torch.randint(12, (31,), generator=torch.Generator().manual_seed(2))
    settings = DynamicSettings(lr=0.05, decay=0.1, window=10)
    copy = adaptable(model)
    rms = gradient_rms(copy, tokens, 10, 30)
    got = dynamic_perplexity(copy, tokens, settings, rms)

    ref = adaptable(model)  # the plain loop: score a window, then step on its mean loss
    theta0 = [p.detach().clone() for p in ref.parameters()]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    total, state = 0.0, None
    for start in range(0, 30, 10):
        X, Y = tokens[start:start + 10][None], tokens[start + 1:start + 11][None]
        logits, state = ref(X, state)
        loss = F.cross_entropy(logits[0], Y[0], reduction="sum")
        total += loss.item()
        ref.zero_grad()
        (loss / 10).backward()
        state = state.detach()
        with torch.no_grad():
            for p, p0, r in zip(ref.parameters(), theta0, rms):
                rate = torch.clamp(r / mean_rms, max=1 / settings.decay) * settings.decay
                p.sub_(settings.lr * p.grad / (r + EPS)).add_(rate * (p0 - p))
    assert got.characters == 30
    assert got.nats_per_char == pytest.approx(total / 30, rel=1e-5)
    for a, b in zip(copy.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_rms_is_the_root_mean_square_of_window_gradients():
    model = adaptable(model_of())
    tokens = torch.randint(12, (161,), generator=torch.Generator().manual_seed(3))
    rms = gradient_rms(model, tokens, 10, 160)  # 16 streams of 10: one window
    model.zero_grad()
    logits, _ = model(tokens[:160].view(16, 10))
    F.cross_entropy(logits.reshape(-1, 12), tokens[1:161].view(16, 10).reshape(-1)).backward()
    for r, p in zip(rms, model.parameters()):
        torch.testing.assert_close(r, p.grad.abs())


@pytest.mark.slow
def test_adapting_pays_on_text_that_repeats_and_uses_no_float64():
    model = model_of()
    once = torch.randint(12, (20,), generator=torch.Generator().manual_seed(4))
    tokens = once.repeat(30)  # a pattern the static model cannot know, seen again and again
    copy = adaptable(model)
    rms = gradient_rms(copy, tokens, 5, 600)
    static = perplexity_of(model, tokens, window=10)
    with no_float64():
        adapted = dynamic_perplexity(copy, tokens, DynamicSettings(lr=0.003, decay=0.01,
                                                                   window=10), rms)
    assert adapted.nats_per_char < static.nats_per_char - 0.3


# -- the command ----------------------------------------------------------------------------------

def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_dynamic_reports_both_figures_and_never_changes_the_checkpoint(tiny_run):
    best = tiny_run / "run" / "best.pt"
    before = sha(best)
    result = invoke("eval", "perplexity", "--checkpoint", str(best), "--dynamic", "--json",
                    "--dynamic-window", "20")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dynamic = report["dynamic"]
    assert (dynamic["lr"], dynamic["decay"], dynamic["window"]) == (1e-4, 0.02, 20)
    assert dynamic["characters"] == report["characters"]
    assert dynamic["gain_nats_per_char"] == pytest.approx(
        report["nats_per_char"] - dynamic["nats_per_char"])
    assert math.isfinite(dynamic["perplexity"]) and sha(best) == before
    static = invoke("eval", "perplexity", "--checkpoint", str(best), "--dynamic", "--json",
                    "--dynamic-lr", "0", "--dynamic-window", "20", "--batch-size", "20")
    zero = json.loads(static.stdout)
    assert zero["dynamic"]["nats_per_char"] == zero["nats_per_char"]
    table = invoke("eval", "perplexity", "--checkpoint", str(best), "--dynamic")
    assert "dynamic perplexity" in table.stdout and "lr 0.0001, decay 0.02, window 50" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--dynamic-lr", "-1"], "--dynamic-lr must be in [0, 1], got -1.0"),
    (["--dynamic-decay", "2"], "--dynamic-decay must be in [0, 1], got 2.0"),
    (["--dynamic-window", "0"], "--dynamic-window must be an integer >= 1, got 0"),
])
def test_bad_dynamic_settings_are_one_line(tiny_run, args, message):
    result = invoke("eval", "perplexity", "--checkpoint", str(tiny_run / "run"), "--dynamic", *args)
    assert (result.exit_code, result.stderr) == (2, f"charlm: error: {message}\n")


def test_eval_dynamic_reads_the_corpus_once(tiny_run, monkeypatch):
    """The evaluated split and the training split come from one read of the corpus (a stream,
    an encoding and a sha256 of all of it: minutes on enwik8)."""
    from charlm.inference import splits

    reads = []
    real = splits.load_dataset

    def counted(**kwargs):
        reads.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(splits, "load_dataset", counted)
    result = invoke("eval", "perplexity", "--checkpoint", str(tiny_run / "run"), "--dynamic",
                    "--json", "--dynamic-window", "20", "--split", "val")
    assert result.exit_code == 0, result.output
    assert len(reads) == 1
    assert json.loads(result.stdout)["dynamic"]["characters"] == json.loads(
        result.stdout)["characters"]


def test_dynamic_needs_the_runs_training_text(tiny_run, tmp_path, monkeypatch):
    """...and says so before any scoring (the static pass takes minutes on a large text)."""
    from charlm.inference import evaluate
    from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint

    def scored(*args, **kwargs):
        raise AssertionError("scored before the checks were done")

    monkeypatch.setattr(evaluate, "perplexity_of", scored)

    ckpt = load_checkpoint(tiny_run / "run" / "best.pt")
    del ckpt["train_config"]
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "version")},
                    tmp_path / "bare.pt")
    result = invoke("eval", "perplexity", "--checkpoint", str(tmp_path / "bare.pt"), "--dynamic",
                    "--text", str(tiny_run / "small.txt"), "-q")
    assert result.exit_code == 1
    assert result.stderr == (
        "charlm: error: --dynamic needs the run's training text (for its gradient statistics) "
        f"but {tmp_path / 'bare.pt'} holds no training configuration to rebuild it from; "
        "evaluate without --dynamic\n")
