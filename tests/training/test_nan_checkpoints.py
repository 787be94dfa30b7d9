"""A run whose loss turns NaN never saves non-finite weights, as best.pt or as last.pt, and its
error line says which checkpoints exist and which of them are good (also after a resume).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from charlm.errors import CharlmError
from charlm.artifacts.checkpoint import load_checkpoint, save_checkpoint
from charlm.config.build import build_config
from charlm.training.trainer import Trainer
from helpers import pydoc_text, run_main

pytestmark = pytest.mark.usefixtures("one_thread")
TAIL = "; try a lower --lr or --clip 1"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    return pydoc_text(tmp_path_factory.mktemp("corpus") / "small.txt", 20_000)


def tiny(small_text: Path, out: Path, **over):
    values = dict(text=[str(small_text)], hidden=16, layers=1, embed=8, dropout=0.0,
                  batch_size=4, num_steps=8, max_steps=30, time_budget="0", log_every=5,
                  eval_every=5, checkpoint_every=5, sample_length=5, eval_tokens=200,
                  impl="fused", out=str(out))
    values.update(over)
    return build_config({}, values)


def poison_at(step: int):
    def hook(trainer):
        if trainer.loop.step == step:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
    return hook


def files(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("*.pt"))


def named(run: Path) -> str:
    """What the error line must say of the run's checkpoints: every one there loads."""
    there = [run / name for name in ("last.pt", "best.pt") if (run / name).exists()]
    if not there:
        return "no checkpoint was saved before it diverged"
    steps = [f"{path} (step {load_checkpoint(path)['step']})" for path in there]
    return f"good checkpoint{'s' if len(there) > 1 else ''}: {', '.join(steps)}"


@pytest.mark.parametrize("eval_every", [1, 2, 3])
def test_a_loss_that_diverges_at_once_saves_only_loadable_checkpoints(small_text, tmp_path,
                                                                      eval_every):
    """lr 1e6: the weights pass 1e6 (or NaN) within a step or two; evaluations of them come
    before any checkpoint, and none of them becomes best.pt."""
    run = tmp_path / "run"
    code, out, err = run_main(["train", "--text", str(small_text), "--hidden", "16", "--layers",
                               "1", "--embed", "8", "--batch-size", "4", "--num-steps", "8",
                               "--optimizer", "sgd", "--lr", "1e6", "--clip", "0",
                               "--dropout", "0", "--max-steps", "40", "--time-budget", "0",
                               "--eval-every", str(eval_every), "--log-every", "12",
                               "--checkpoint-every", "12", "--eval-tokens", "200", "-q",
                               "--out", str(run)])
    assert code == 1
    said = re.fullmatch(r"charlm: error: (loss became (nan|inf)|the weights diverged) by step "
                        r"\d+( \(NaN, infinite or beyond 1e\+06: not saved\))?; training "
                        r"stopped; (.*)" + re.escape(TAIL) + "\n", err)
    assert said and said[4] == named(run), err


def test_nan_before_any_checkpoint_leaves_none(small_text, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny(small_text, run, eval_every=2, checkpoint_every=10, log_every=10))
    trainer.step_hook = poison_at(1)  # the evaluation at step 2 is NaN: no best.pt from it
    with pytest.raises(CharlmError) as err:
        trainer.run()
    assert str(err.value) == ("loss became nan by step 10; training stopped; no checkpoint was "
                              f"saved before it diverged{TAIL}")
    assert files(run) == []


@pytest.mark.parametrize("poison, saved, stop", [(7, 5, 10), (12, 10, 15), (10, 10, 15)])
def test_good_checkpoints_are_kept_and_named(small_text, tmp_path, poison, saved, stop):
    run = tmp_path / "run"
    trainer = Trainer(tiny(small_text, run))
    trainer.step_hook = poison_at(poison)  # after that step's own checks and saves
    with pytest.raises(CharlmError) as err:
        trainer.run()
    assert str(err.value) == (
        f"loss became nan by step {stop}; training stopped; good checkpoints: "
        f"{run / 'last.pt'} (step {saved}), {run / 'best.pt'} (step "
        f"{load_checkpoint(run / 'best.pt')['step']}){TAIL}")
    assert load_checkpoint(run / "last.pt")["step"] == saved  # loads: every weight is finite


def test_non_finite_weights_at_the_final_save_are_not_saved(small_text, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny(small_text, run, max_steps=12, log_every=100, eval_every=100,
                           checkpoint_every=10))
    trainer.step_hook = poison_at(12)  # after the last step's checks, before the final save
    with pytest.raises(CharlmError) as err:
        trainer.run()
    assert str(err.value) == (
        "the weights diverged by step 12 (NaN, infinite or beyond 1e+06: not saved); training "
        f"stopped; good checkpoint: {run / 'last.pt'} (step 10){TAIL}")
    assert load_checkpoint(run / "last.pt")["step"] == 10


def test_on_resume_a_damaged_best_pt_is_named_and_the_good_last_pt_too(small_text, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny(small_text, run, max_steps=10)).run()
    best = load_checkpoint(run / "best.pt")
    best["model"] = {k: torch.full_like(v, float("nan")) for k, v in best["model"].items()}
    save_checkpoint(best, run / "best.pt")  # as an older charlm wrote it
    last = run / "last.pt"
    trainer = Trainer(tiny(small_text, run, max_steps=30),
                      resume={"ckpt": load_checkpoint(last), "path": last})
    trainer.step_hook = poison_at(12)
    with pytest.raises(CharlmError) as caught:
        trainer.run()
    assert str(caught.value) == (
        f"loss became nan by step 15; training stopped; good checkpoint: {last} (step 10); "
        f"{run / 'best.pt'} holds damaged or non-finite weights: do not use{TAIL}")
