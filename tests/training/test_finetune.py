"""Fine-tuning (`charlm train --init-from`, char-rnn's -init_from): a new run from trained
weights, the vocabulary extended by the new text's characters, the model's sizes its own."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charlm.artifacts.checkpoint import load_checkpoint
from charlm.config.build import build_config
from charlm.inference.loading import model_from_checkpoint
from charlm.model.lm import CharLM
from charlm.training.trainer import Trainer
from helpers import TINY, pydoc_text, run_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A trained source run (no dropout, so a training step's loss is the model's loss)."""
    root = tmp_path_factory.mktemp("source")
    text = pydoc_text(root / "old.txt", 8000)
    runs = {}
    for name, embed in (("embedded", 8), ("one-hot", 0)):
        cfg = build_config({}, dict(text=[str(text)], hidden=16, layers=2, embed=embed,
                                    dropout=0.0, batch_size=4, num_steps=8, max_steps=12,
                                    time_budget="0", eval_every=6, checkpoint_every=6,
                                    sample_length=5, out=str(root / name)))
        Trainer(cfg).run()
        runs[name] = root / name
    return {"root": root, "text": text, **runs}


def config(text: Path, out: Path, **over):
    return build_config({}, {**dict(text=[str(text)], batch_size=4, num_steps=8, max_steps=3,
                                    time_budget="0", eval_every=100, sample_length=5,
                                    out=str(out)), **over})


def test_a_fine_tuned_run_starts_at_the_source_models_loss(source, tmp_path):
    """The first step's loss on the old text is the source model's loss on that batch."""
    trainer = Trainer(config(source["text"], tmp_path / "ft", init_from=str(source["embedded"]),
                             seed=7))
    assert trainer.model_config.hidden == 16 and trainer.cfg.dropout == 0.0  # the source's
    first = []
    step = trainer.train_step

    def recorded(X, Y, state):
        loss, state_out = step(X, Y, state)
        first.append((X.clone(), Y.clone(), state, loss.item()))
        return loss, state_out

    trainer.train_step = recorded
    trainer.run()
    X, Y, state, loss = first[0]
    assert state is None  # the first batch of a run starts from a zero state
    model = model_from_checkpoint(load_checkpoint(source["embedded"] / "best.pt")).model
    with torch.no_grad():
        logits, _ = model(X)
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), Y.reshape(-1)).item()
    assert loss == pytest.approx(want, rel=1e-5)
    assert len(trainer.data.vocab) == model.config.vocab_size  # the same characters: no new ones


@pytest.mark.parametrize("kind", ["embedded", "one-hot"])
def test_new_characters_extend_the_vocabulary_and_the_old_rows_are_kept(source, tmp_path, kind):
    new = tmp_path / "new.txt"
    new.write_text("ĀĀāĂ » " + source["text"].read_text(encoding="utf-8"), encoding="utf-8")
    ckpt = load_checkpoint(source[kind] / "best.pt")
    old_tokens = ckpt["vocab"]["tokens"]
    trainer = Trainer(config(new, tmp_path / "ft", init_from=str(source[kind]), seed=5))
    tokens = trainer.data.vocab.tokens
    assert tokens[: len(old_tokens)] == old_tokens  # every old id keeps its character
    # the new ones after them, most frequent first (ties: by code point)
    assert tokens[len(old_tokens):] == ["Ā", "»", "ā", "Ă"]
    v, n = len(old_tokens), len(tokens)
    assert trainer.data.train[:4].tolist() == [v, v, v + 2, v + 3]
    # a fresh model of the new size, seeded as the run seeds its model
    torch.manual_seed(5)
    fresh = CharLM(trainer.model_config).state_dict()
    got, old = trainer.model.state_dict(), ckpt["model"]
    vocab_dim = {"embedding.weight": 0, "head.weight": 0, "head.bias": 0,
                 "rnn.weight_ih_l0": 1 if kind == "one-hot" else None}
    for name, weight in got.items():
        dim = vocab_dim.get(name)
        if dim is None:
            assert torch.equal(weight, old[name]), name
        else:
            assert weight.shape[dim] == n
            assert torch.equal(weight.narrow(dim, 0, v), old[name]), name
            assert torch.equal(weight.narrow(dim, v, n - v), fresh[name].narrow(dim, v, n - v))
    assert ("embedding.weight" in got) == (kind == "embedded")


def test_the_run_records_where_it_started(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    run = tmp_path / "ft"
    code, out, err = run_main(["train", "--text", str(source["text"]), *TINY, "--init-from",
                               str(source["embedded"]), "--out", str(run), "--json"])
    assert code == 0, err
    where = str(source["embedded"] / "best.pt")
    assert json.loads(out)["init_from"] == where
    config = {k: v for table in tomllib.loads((run / "config.toml").read_text()).values()
              for k, v in table.items()}  # tables by help panel, flattened
    assert (config["init_from"], config["hidden"], config["dropout"]) == (where, 16, 0.0)
    assert load_checkpoint(run / "last.pt")["train_config"]["init_from"] == where
    code, _, err = run_main(["train", "--text", str(source["text"]), *TINY[:-1], "--init-from",
                             str(source["embedded"]), "--out", str(tmp_path / "again")])
    assert code == 0 and err.startswith(f"fine-tuning {where}: gru 2x16 "), err


@pytest.mark.parametrize("given, said", [
    (["--cell", "lstm"], "--cell lstm differs from the model of {src} (cell gru)"),
    (["--hidden", "32", "--layers", "3"],
     "--hidden 32 and --layers 3 differ from the model of {src} (hidden 16, layers 2)"),
    (["--embed", "4"], "--embed 4 differs from the model of {src} (embed 8)"),
    (["--preprocessing", "d2l"], "--preprocessing d2l differs from the model of {src} "
                                 "(preprocessing raw)"),
])
def test_options_that_change_the_weights_shapes_are_refused(source, tmp_path, monkeypatch,
                                                            given, said):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    code, out, err = run_main(["train", "--text", str(source["text"]), *TINY, "--init-from",
                               str(source["embedded"]), *given, "--out", str(tmp_path / "ft")])
    src = source["embedded"] / "best.pt"
    assert (code, out, err) == (2, "", f"charlm: error: {said.format(src=src)} that --init-from "
                                       "starts from: its weights keep their shapes; drop the "
                                       "option, or train a new model without --init-from\n")
    assert not (tmp_path / "ft").exists()


def test_an_exported_folder_is_a_source_too(source, tmp_path, monkeypatch):
    """A folder written by `charlm export` holds the weights generate uses: they are the ones
    a fine-tuned model starts with."""
    from safetensors.torch import load_file

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    folder = tmp_path / "share"
    code, _, err = run_main(["export", str(source["embedded"]), "--out", str(folder),
                             "--sample-length", "5"])
    assert code == 0, err
    trainer = Trainer(config(source["text"], tmp_path / "ft", init_from=str(folder)))
    assert trainer.cfg.init_from == str(folder.resolve())
    weights = load_file(folder / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], w) for k, w in weights.items())
