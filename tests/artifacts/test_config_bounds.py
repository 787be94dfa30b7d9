"""A checkpoint's model config is bounded by the tensors the file holds.

A small checkpoint whose model_config asks for a huge model (hidden 12000: 5 GB of weights) must
be refused by comparing the saved tensors' names and shapes with those the config implies,
computed on the meta device, before a real model is built: generate, eval, export, train
--resume and train --init-from each end in one `charlm: error:` line, exit 1, with no real CharLM
constructed (a build anywhere but on the meta device raises here, so a regression is a "bug in
charlm" line, not gigabytes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from charlm.model.lm import CharLM
from helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 10**6


def _more_tokens(ckpt: dict, size: int) -> None:
    """The vocabulary grown to `size` distinct single characters (its counts with it)."""
    tokens = ckpt["vocab"]["tokens"]
    have = set(tokens)
    extra = (chr(c) for c in range(0x100, 0x110000)
             if not 0xD800 <= c <= 0xDFFF and chr(c) not in have)
    tokens += [next(extra) for _ in range(size - len(tokens))]
    if ckpt["vocab"].get("counts"):
        ckpt["vocab"]["counts"] += [0] * (size - len(ckpt["vocab"]["counts"]))


# What each crafted file asks for: the same key in model_config and train_config (which a
# resumed run must agree with), the tensors left as the tiny run saved them.
# and the line that refuses it (the tiny run: a GRU of 16 units over 8-wide embeddings of 92
# tokens).
HOSTILE = {
    "hidden": ("hidden", 12000, "parameter rnn.weight_ih_l0 is (48, 8) but its model config "
               "gives (36000, 8)"),
    "layers": ("layers", 500, "its parameters do not match its model config (missing "
               "rnn.weight_ih_l1, rnn.weight_hh_l1, rnn.bias_ih_l1)"),
    "vocab_size": ("vocab_size", VOCAB, "parameter embedding.weight is (92, 8) but its model "
                   f"config gives ({VOCAB}, 8)"),
    "embed": ("embed", 10**6, "parameter embedding.weight is (92, 8) but its model config gives "
              "(92, 1000000)"),
}

COMMANDS = {
    "generate": ["generate", "--checkpoint", "{ckpt}", "--length", "5", "--seed", "1"],
    "eval": ["eval", "perplexity", "--checkpoint", "{ckpt}", "--text", "{small}"],
    "export": ["export", "{ckpt}", "--out", "{out}"],
    "resume": ["train", "--resume", "{run}", "--max-steps", "12", "-q"],
    "init-from": ["train", "--init-from", "{ckpt}", "--text", "{small}", "--max-steps", "2",
                  "--out", "{out}", "-q"],
}


@pytest.fixture
def no_real_model(monkeypatch):
    """CharLM may be built on the meta device only: any other build raises."""
    original = CharLM.__init__

    def guarded(self, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise AssertionError("a real CharLM was built from an unchecked config")
        original(self, *args, **kwargs)

    monkeypatch.setattr(CharLM, "__init__", guarded)


def crafted(tiny_run: Path, tmp_path: Path, key: str, value: int) -> Path:
    """A copy of the tiny run whose last.pt says `key` = `value`, its tensors unchanged."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["model_config"][key] = value
    if key in ckpt["train_config"]:
        ckpt["train_config"][key] = value
    if key == "vocab_size":
        _more_tokens(ckpt, value)
    ckpt["hidden"] = None  # the carried state would be refused first, against train_config
    torch.save(ckpt, run / "last.pt")
    (run / "best.pt").unlink()
    return run


# a million-token vocabulary takes seconds to read: in the full suite only
@pytest.mark.parametrize("case", [pytest.param(k, marks=pytest.mark.slow) if k == "vocab_size" else k
                                  for k in HOSTILE])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_config_larger_than_its_tensors_is_refused_before_any_model_is_built(
        command, case, tiny_run, tmp_path, monkeypatch, no_real_model):
    key, value, problem = HOSTILE[case]
    run = crafted(tiny_run, tmp_path, key, value)
    # tens of KB; 16 MB with a million-token vocabulary
    assert (run / "last.pt").stat().st_size < (20 << 20)
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    args = [a.format(ckpt=run / "last.pt", run=run, small=tiny_run / "small.txt",
                     out=tmp_path / "out") for a in COMMANDS[command]]
    code, out, err = run_main(args)
    assert (code, out, err) == (
        1, "", f"charlm: error: {run / 'last.pt'}: {problem}; the file is damaged\n")
    assert not (tmp_path / "out").exists()


def test_the_averaged_weights_are_checked_against_the_config_too(tiny_run, tmp_path, monkeypatch,
                                                                 no_real_model):
    """An `ema` entry whose weights do not fit the model config is refused before a model is
    built, even where the raw weights are the ones asked for (a resumed run would load both)."""
    run = crafted(tiny_run, tmp_path, "dropout", 0.0)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    averaged = {name: t.clone() for name, t in ckpt["model"].items()}
    averaged["head.weight"] = torch.zeros(92, 12000)
    ckpt["ema"] = {"decay": 0.9, "updates": 3, "model": averaged}
    torch.save(ckpt, run / "last.pt")
    code, out, err = run_main(["generate", "--checkpoint", str(run / "last.pt"), "--weights", "raw",
                               "--length", "5"])
    assert (code, out, err) == (
        1, "", f"charlm: error: {run / 'last.pt'} (its averaged weights): parameter head.weight "
        "is (92, 12000) but its model config gives (92, 16); the file is damaged\n")
