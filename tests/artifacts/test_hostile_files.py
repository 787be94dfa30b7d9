"""Hostile and edited checkpoint files: nothing in a .pt file runs, and no field is used unchecked.

A checkpoint is read with torch.load(weights_only=True), which refuses any pickled callable; these
tests craft files that run code when unpickled the ordinary way (and prove that they do), then
hand them to `generate`, `eval perplexity` and `train --resume`. Edited checkpoints (loaded with
weights_only=True, a field changed, saved again) must be refused with one line naming the field.
"""

from __future__ import annotations

import math
import os
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
import torch

from charlm.artifacts.checkpoint import load_checkpoint
from charlm.errors import CharlmError
from charlm.inference.loading import model_from_checkpoint
from helpers import run_main

CODE = ("holds code objects, not plain data; refusing to load it (charlm checkpoints hold only "
        "tensors, numbers, strings, lists and dicts)")


class Touch:
    """Unpickles as a call to Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class Shell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plain(tiny_run: Path) -> dict:
    return torch.load(tiny_run / "run" / "last.pt", weights_only=True)


def hostile_files(tiny_run: Path, folder: Path) -> tuple[dict[str, Path], Path]:
    """Files that create `marker` when unpickled without weights_only, in several disguises."""
    marker = folder / "MARKER"
    files = {
        # a real checkpoint with one field swapped for the payload, written by torch.save
        "torch.save, in model_config": {**plain(tiny_run), "model_config": Touch(marker)},
        # the payload hidden among the weights
        "torch.save, among the weights": {
            **plain(tiny_run), "model": {**plain(tiny_run)["model"], "x": Touch(marker)}},
    }
    paths = {}
    for i, (name, data) in enumerate(files.items()):
        paths[name] = folder / f"evil{i}.pt"
        torch.save(data, paths[name])
    paths["pickle protocol 4, os.system"] = folder / "evil-pickle.pt"
    with open(paths["pickle protocol 4, os.system"], "wb") as fh:
        pickle.dump({"format": "charlm-checkpoint", "x": Shell(marker)}, fh, protocol=4)
    paths["pickle protocol 0"] = folder / "evil-proto0.pt"
    with open(paths["pickle protocol 0"], "wb") as fh:
        pickle.dump(Touch(marker), fh, protocol=0)
    return paths, marker


def test_the_hostile_files_do_run_code_when_loaded_unsafely(tiny_run, tmp_path):
    paths, marker = hostile_files(tiny_run, tmp_path)
    for name, path in paths.items():
        if "torch.save" in name:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), name  # so refusing them below means something
        marker.unlink()


def test_load_checkpoint_refuses_them_without_running_anything(tiny_run, tmp_path):
    paths, marker = hostile_files(tiny_run, tmp_path)
    for name, path in paths.items():
        with pytest.raises(CharlmError) as info:
            load_checkpoint(path)
        if name == "pickle protocol 0":  # not even handed to the unpickler
            assert str(info.value) == (
                f"{path} is not a charlm checkpoint (not a file written by torch.save)")
        else:
            assert str(info.value) == f"{path} {CODE}", name
    assert not marker.exists()


def test_every_command_refuses_them_with_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    paths, marker = hostile_files(tiny_run, tmp_path)
    resume = tmp_path / "run"
    shutil.copytree(tiny_run / "run", resume)
    shutil.copy(paths["torch.save, among the weights"], resume / "last.pt")
    before = {p.name: p.read_bytes() for p in resume.iterdir()}
    commands = [
        (["generate", "--checkpoint", str(paths["torch.save, in model_config"])],
         paths["torch.save, in model_config"]),
        (["eval", "perplexity", "--checkpoint", str(paths["pickle protocol 4, os.system"]),
          "--text", str(tiny_run / "small.txt")], paths["pickle protocol 4, os.system"]),
        (["train", "--resume", str(resume), "--max-steps", "12"], resume / "last.pt"),
    ]
    for args, path in commands:
        assert run_main(args) == (1, "", f"charlm: error: {path} {CODE}\n"), args[0]
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in resume.iterdir()} == before  # nothing written


# --- edited checkpoints: model_from_checkpoint --------------------------------------------------


def _set(path: str, value):
    """An edit that sets ckpt[path], or ckpt[top][rest] for 'top.rest' (weight names hold dots)."""
    def edit(ckpt: dict) -> None:
        if "." in path:
            top, key = path.split(".", 1)
            ckpt[top][key] = value
        else:
            ckpt[path] = value
    return edit


def _nan(ckpt):
    ckpt["model"]["head.weight"][0, 0] = math.nan


def _trim_vocab(ckpt):
    ckpt["vocab"]["tokens"] = ckpt["vocab"]["tokens"][:-1]
    ckpt["vocab"]["counts"] = ckpt["vocab"]["counts"][:-1]


def _extra_weight(ckpt):
    ckpt["model"]["extra.weight"] = torch.zeros(2)


def _wide_embedding(ckpt):
    ckpt["model"]["embedding.weight"] = torch.zeros(ckpt["model_config"]["vocab_size"], 9)


MODEL_EDITS = [
    ("nan-weight", _nan,
     "checkpoint: parameter head.weight holds NaN or infinity; use another checkpoint"),
    ("head-shape", _set("model.head.weight", torch.zeros(3, 16)),
     "checkpoint: parameter head.weight is (3, 16) but its model config gives ({V}, 16); "
     "the file is damaged"),
    ("embedding-width", _wide_embedding,
     "checkpoint: parameter embedding.weight is ({V}, 9) but its model config gives ({V}, 8); "
     "the file is damaged"),
    ("vocab-shorter-than-embedding", _trim_vocab,
     "checkpoint: its vocabulary has {V-1} tokens but its model config says {V}; the file is "
     "damaged"),
    ("extra-weight", _extra_weight,
     "checkpoint: its parameters do not match its model config (unexpected extra.weight); "
     "the file is damaged"),
    ("weights-not-a-table", _set("model", [torch.zeros(2)]),
     "checkpoint: its 'model' entry is not a table of tensors; the file is damaged"),
    ("config-not-a-table", _set("model_config", [16, 1]),
     "checkpoint's model config is not a table; the file is damaged"),
    ("config-unknown-key", _set("model_config.heads", 4),
     "checkpoint's model config has unknown keys ['heads']; it was written by a newer charlm: "
     "upgrade charlm to load it"),
    ("config-hidden-a-string", _set("model_config.hidden", "16"),
     "checkpoint's model config is invalid: hidden must be an integer in [1, 16777216], got '16'"),
    ("config-hidden-a-bool", _set("model_config.hidden", True),
     "checkpoint's model config is invalid: hidden must be an integer in [1, 16777216], got True"),
    ("config-unknown-cell", _set("model_config.cell", "transformer"),
     "checkpoint's model config is invalid: cell must be one of rnn, gru, lstm, mingru, minlstm; got 'transformer'"),
    ("config-dropout-one", _set("model_config.dropout", 1.0),
     "checkpoint's model config is invalid: dropout must be in [0, 1), got 1.0"),
    ("config-vocab-size-zero", _set("model_config.vocab_size", 0),
     "checkpoint's model config is invalid: vocab_size must be an integer in [1, 1114113], got 0"),
]


@pytest.mark.parametrize("edit, message", [pytest.param(e, m, id=i) for i, e, m in MODEL_EDITS])
def test_model_from_checkpoint_checks_every_field_first(edit, message, tiny_run):
    ckpt = plain(tiny_run)
    V = ckpt["model_config"]["vocab_size"]
    edit(ckpt)
    with pytest.raises(CharlmError) as info:
        model_from_checkpoint(ckpt)
    assert str(info.value) == message.replace("{V-1}", str(V - 1)).replace("{V}", str(V))


def test_model_from_an_unedited_checkpoint_predicts_like_the_trainer_saved_it(tiny_run):
    ckpt = plain(tiny_run)
    model = model_from_checkpoint(ckpt, impl="scratch").model
    again = model_from_checkpoint(ckpt, impl="fused").model
    tokens = torch.arange(20)[None] % ckpt["model_config"]["vocab_size"]
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0], again(tokens)[0], atol=1e-5)


# --- edited checkpoints: the commands -----------------------------------------------------------


DAMAGED = "the file is damaged or was edited"
CLI_EDITS = {
    "nan-weight": (_nan, "{path}: its weight head.weight holds NaN or infinity; the file is "
                   "damaged: use another checkpoint (best.pt or last.pt of the run)"),
    "head-shape": (_set("model.head.weight", torch.zeros(3, 16)),
                   "{path}: parameter head.weight is (3, 16) but its model config gives ({V}, 16); "
                   "the file is damaged"),
    "vocab-shorter": (_trim_vocab, "{path}: its vocabulary has {V-1} tokens but its model config "
                      "says {V}; the file is damaged"),
    "config-hidden-a-string": (_set("model_config.hidden", "16"),
                               "checkpoint's model config is invalid: hidden must be an integer "
                               "in [1, 16777216], got '16'"),
    "train-config-hidden-a-string": (_set("train_config.hidden", "16"),
                                     "{path}: its 'train_config' entry has hidden = '16', of the "
                                     f"wrong type; {DAMAGED}"),
    "state-of-other-shape": (_set("hidden", torch.zeros(2, 4, 16)),
                             "{path}: its 'hidden' entry has shape (2, 4, 16) but its "
                             f"train_config has layers = 1 and hidden = 16; {DAMAGED}"),
    "step-negative": (_set("step", -3),
                      f"{{path}}: its 'step' entry is -3, not a whole number in [0, 2**63); {DAMAGED}"),
    "step-a-string": (_set("step", "ten"),
                      f"{{path}}: its 'step' entry is 'ten', not a whole number in [0, 2**63); {DAMAGED}"),
    "rng-other-size": (_set("rng.torch", torch.zeros(3, dtype=torch.uint8)),
                       f"{{path}}: its 'rng' entry does not hold a torch generator state; "
                       f"{DAMAGED}"),
    "optimizer-empty": (_set("optimizer", {}),
                        f"{{path}}: its 'optimizer' entry lacks its 'state' and "
                        f"'param_groups'; {DAMAGED}"),
    "elapsed-nan": (_set("elapsed", math.nan),
                    f"{{path}}: its 'elapsed' entry is nan, not a number of seconds; {DAMAGED}"),
}
COMMANDS = {
    "generate": ["generate", "--checkpoint", "{path}", "--length", "5", "--seed", "1"],
    "eval": ["eval", "perplexity", "--checkpoint", "{path}", "--text", "{small}"],
    "resume": ["train", "--resume", "{run}", "--max-steps", "12", "-q"],
}
# A resumed run rebuilds its model with the checkpoint's own loader, so it reads model_config too.
NOT_READ: set = set()


@pytest.mark.parametrize("edit, command", [
    pytest.param(e, c, id=f"{c}-{e}")
    for e in CLI_EDITS for c in COMMANDS if (c, e) not in NOT_READ])
def test_commands_refuse_edited_checkpoints_with_one_line(edit, command, tiny_run, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    ckpt = plain(tiny_run)
    V = ckpt["model_config"]["vocab_size"]
    change, message = CLI_EDITS[edit]
    change(ckpt)
    torch.save(ckpt, run / "last.pt")
    (run / "best.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = [a.replace("{path}", str(run / "last.pt")).replace("{run}", str(run))
            .replace("{small}", str(tiny_run / "small.txt")) for a in COMMANDS[command]]
    code, out, err = run_main(args)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    expected = (message.replace("{path}", str(run / "last.pt")).replace("{V-1}", str(V - 1))
                .replace("{V}", str(V)))
    assert (code, out, err) == (1, "", f"charlm: error: {expected}\n")
