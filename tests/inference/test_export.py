"""`charlm export`: a folder with no pickle in it, which generate and eval read with the same
results as the checkpoint, a model card whose figures and sample are the commands' own, and
refusals (hostile checkpoints, folders whose files disagree, occupied --out) that leave nothing
behind. The runs are real: tiny runs of the real trainer, made once for this module."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import shlex
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import charlm
from helpers import TINY, run_main, train_runs

pytestmark = pytest.mark.usefixtures("one_thread")

FILES = ["README.md", "config.json", "model.safetensors"]
APART = "the files do not belong together"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """`gru` (one layer, embedding, raw text), `lstm` (two layers, one-hot, d2l text) and `awd`
    (tied weights, locked and embedding dropout, weight drop, averaged weights)."""
    return train_runs(tmp_path_factory.mktemp("export"), {
        "gru": ["--layers", "1", "--embed", "8"],
        "lstm": ["--cell", "lstm", "--layers", "2", "--embed", "0", "--preprocessing", "d2l"],
        "awd": ["--layers", "2", "--embed", "16", "--tie-weights", "--locked-dropout",
                "--dropout", "0.2", "--embed-dropout", "0.1", "--weight-drop", "0.2",
                "--ema", "0.9"],
    })


@pytest.fixture(scope="module")
def exported(runs):
    """{run: (folder, export's --json, its stderr)}, exported once."""
    done = {}
    for name in ("gru", "lstm", "awd"):
        out = runs["root"] / "share" / name
        code, stdout, err = run_main(["export", str(runs[name]), "--out", str(out), "--json"])
        assert code == 0, err
        done[name] = (out, json.loads(stdout), err)
    return done


def ckpt_of(run: Path) -> dict:
    return torch.load(run / "best.pt", weights_only=True)


def safetensors_header(path: Path) -> dict:
    """The header, read with the standard library: the file is a length, JSON, raw arrays."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


# --- the folder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["gru", "lstm", "awd"])
def test_the_folder_holds_plain_weights_and_the_models_facts(runs, exported, run):
    folder, result, err = exported[run]
    ckpt = ckpt_of(runs[run])
    if ckpt.get("ema"):  # a run trained with --ema shares its averaged weights, as generate uses
        ckpt["model"] = ckpt["ema"]["model"]
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert sorted(result["files"]) == FILES
    assert result["files"] == {p.name: p.stat().st_size for p in folder.iterdir()}
    header = safetensors_header(folder / "model.safetensors")
    assert header.pop("__metadata__") == {"format": "pt"}
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        k: ("F32", list(v.shape)) for k, v in ckpt["model"].items()}
    weights = load_file(folder / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert (config["format"], config["version"]) == ("charlm-model", 1)
    assert config["model"] == {k: v for k, v in ckpt["model_config"].items() if k != "impl"}
    assert config["vocab"] == ckpt["vocab"]
    assert config["preprocessing"] == ckpt["preprocessing"]
    training = config["training"]
    assert {k: training[k] for k in ("step", "tokens_seen", "best_val_loss")} == {
        k: ckpt[k] for k in ("step", "tokens_seen", "best_val_loss")}
    assert training["train_config"] == ckpt["train_config"]
    assert training["corpus"] == ckpt["corpus"]
    assert config["evaluation"] == result["evaluation"]
    assert "onnx" not in config
    characters = ckpt["corpus"]["splits"]["val"] - 1
    tied = {"head.weight"} if ckpt["model_config"].get("tie_weights") else set()  # the embedding
    parameters = sum(v.numel() for k, v in ckpt["model"].items() if k not in tied)
    saved = datetime.datetime.fromtimestamp((runs[run] / "best.pt").stat().st_mtime)
    assert err.splitlines() == [
        f"charlm: exporting {runs[run] / 'best.pt'}: {ckpt['model_config']['cell']} "
        f"{ckpt['model_config']['layers']}x16, "
        f"{parameters:,} parameters, corpus small, trained to step 20, saved "
        f"{saved:%Y-%m-%d %H:%M}" + (", averaged weights (--ema)" if run == "awd" else ""),
        f"charlm: evaluating on the validation split ({characters:,} characters)",
    ]


def test_the_plain_text_line_names_the_files_and_figures(runs, tmp_path):
    out = tmp_path / "plain"
    code, stdout, err = run_main(["export", str(runs["gru"]), "--out", str(out), "--sample-length", "20"])
    assert code == 0, err
    ev = json.loads((out / "config.json").read_text())["evaluation"]
    sizes = ", ".join(f"{p.name} ({p.stat().st_size:,} bytes)" for p in sorted(out.iterdir()))
    assert stdout == (f"wrote {out}/: {sizes}; validation perplexity {ev['perplexity']:.4f}, "
                      f"{ev['bits_per_char']:.4f} bits/char\n"
                      f"use it: charlm generate --checkpoint {out} --prefix \"...\"\n")


# --- the same results as the checkpoint -----------------------------------------------------------


def both(args: list[str], run: Path, folder: Path) -> tuple[dict, dict]:
    """A command's --json output with the checkpoint, then with the exported folder."""
    outputs = []
    for where in (run, folder):
        code, stdout, err = run_main([*args, "--checkpoint", str(where), "--json", "-q"])
        assert (code, err) == (0, ""), err
        outputs.append(json.loads(stdout))
    return outputs[0], outputs[1]


@pytest.mark.parametrize("run", ["gru", "lstm", "awd"])
def test_eval_gives_the_same_figures_and_the_card_holds_them(runs, exported, run):
    folder, result, _ = exported[run]
    from_ckpt, from_folder = both(["eval", "perplexity"], runs[run], folder)
    # a folder holds one set of weights (the run's average, if any); "model" names the file
    drop = ("checkpoint", "weights", "model")
    assert {k: v for k, v in from_folder.items() if k not in drop} == {
        k: v for k, v in from_ckpt.items() if k not in drop}
    figures = {k: from_ckpt[k] for k in ("perplexity", "nats_per_char", "bits_per_char",
                                         "characters", "unk_characters", "unk_share")}
    assert result["evaluation"] == {"split": "val", **figures}
    text = both(["eval", "perplexity", "--text", str(runs["text"])], runs[run], folder)
    assert text[0]["perplexity"] == text[1]["perplexity"]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gru", "lstm", "awd"])
@pytest.mark.parametrize("args", [
    ["--prefix", "the ", "--length", "40", "--seed", "5"],
    ["--prefix", "the ", "--length", "40", "--greedy"],
    ["--length", "30", "--seed", "2", "--num-samples", "3", "--temperature", "0.7", "--top-k", "5"],
    ["--prefix", "the ", "--length", "20", "--beam", "3", "--num-samples", "2"],
], ids=["sampled", "greedy", "batch", "beam"])
def test_generate_gives_the_same_text(runs, exported, run, args):
    from_ckpt, from_folder = both(["generate", *args], runs[run], exported[run][0])
    assert from_folder["samples"] == from_ckpt["samples"]
    assert from_folder.get("scores") == from_ckpt.get("scores")


# --- the model card -------------------------------------------------------------------------------


def card_parts(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.mark.parametrize("run", ["gru", "lstm"])
def test_the_card_header_is_hugging_face_metadata_with_the_exact_figures(runs, exported, run):
    folder, result, _ = exported[run]
    meta, body = card_parts(folder)
    ev, cell = result["evaluation"], ckpt_of(runs[run])["model_config"]["cell"]
    assert meta["library_name"] == "charlm"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"charlm", "character-level", cell, "safetensors"} <= set(meta["tags"])
    assert meta["datasets"] == ["small"]  # --text small.txt: the corpus is named by its stem
    assert meta["metrics"] == ["perplexity", "bpc"]
    [model] = meta["model-index"]
    assert model["name"] == run
    [results] = model["results"]
    assert results["task"]["type"] == "text-generation"
    assert results["dataset"]["split"] == "validation"
    assert {m["type"]: m["value"] for m in results["metrics"]} == {
        "perplexity": ev["perplexity"], "bpc": ev["bits_per_char"]}
    assert (f"| validation | {ev['characters']:,} | {ev['perplexity']:.4f} | "
            f"{ev['bits_per_char']:.4f} | {ev['nats_per_char']:.4f} | {ev['unk_share']:.4%} |"
            ) in body
    for section in ("## Evaluation", "## Sample", "## Training", "## How to use", "## Files"):
        assert f"\n{section}\n" in body


def test_the_card_counts_epochs_in_the_singular_and_plural(exported):
    """The card said "1 full epochs"."""
    from charlm.artifacts.card import CardFacts, model_card

    config = json.loads((exported["gru"][0] / "config.json").read_text())
    for epochs, words in ((0, "0 full epochs"), (1, "1 full epoch"), (2, "2 full epochs")):
        config["training"]["epoch"] = epochs
        card = model_card(CardFacts(config=config, parameters=1, evaluation=None, sample="x",
                                    prefix="", sample_length=1, seed=0, onnx=False,
                                    weights_bytes=1))
        assert f" characters seen, {words}) |" in card


def test_a_byte_level_models_card_gives_bits_per_byte_and_per_character(tmp_path, monkeypatch):
    """A byte-level model's figures were labelled per character but were per byte."""
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    text = tmp_path / "mixed.txt"
    text.write_text("Grüße aus Köln, 東京 und Zürich: naïve café — " * 150, encoding="utf-8")
    run, out = tmp_path / "bytes", tmp_path / "share"
    code, _, err = run_main(["train", "--text", str(text), *TINY, "--layers", "1",
                             "--preprocessing", "bytes", "--out", str(run)])
    assert code == 0, err
    code, _, err = run_main(["export", str(run), "--out", str(out), "--sample-length", "10"])
    assert code == 0, err
    ev = json.loads((out / "config.json").read_text())["evaluation"]
    assert ev["unit"] == "byte" and ev["bytes"] >= ev["characters"]
    code, stdout, err = run_main(["eval", "perplexity", "--checkpoint", str(out), "--json"])
    assert code == 0, err
    assert {k: v for k, v in json.loads(stdout).items() if k in ev} == ev
    meta, body = card_parts(out)
    [results] = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results["metrics"]} == {
        "perplexity": ev["perplexity"], "bpc": ev["bits_per_char"],
        "bits_per_byte": ev["bits_per_byte"]}
    assert ("| split | bytes | characters | perplexity (per byte) | bits / byte | bits / char |"
            in body)
    assert (f"| validation | {ev['bytes']:,} | {ev['characters']:,} | {ev['perplexity']:.4f} | "
            f"{ev['bits_per_byte']:.4f} | {ev['bits_per_char']:.4f} |") in body
    assert "| bytes | " in body and " bytes seen, 0 full epochs) |" in body


@pytest.mark.parametrize("run", ["gru", "lstm"])
def test_the_cards_command_draws_the_cards_sample(runs, exported, run, monkeypatch):
    folder, result, _ = exported[run]
    _, body = card_parts(folder)
    sample = body.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert sample == result["sample"]
    assert len(sample) > 300  # the prefix and 300 characters
    [command] = [line for line in body.splitlines()
                 if line.startswith(f"charlm generate --checkpoint {run} ") and "--seed" in line]
    monkeypatch.chdir(folder.parent)
    code, stdout, err = run_main(shlex.split(command)[1:])
    assert (code, err) == (0, f"charlm: using {charlm.load(run, device='cpu').describe()}\n")
    assert stdout == sample + "\n"


def test_a_run_without_a_validation_split_is_exported_with_a_warning(runs, tmp_path):
    made = train_runs(tmp_path, {"noval": ["--layers", "1", "--val-fraction", "0"]})
    out = tmp_path / "share"
    code, stdout, err = run_main(["export", str(made["noval"]), "--out", str(out),
                                  "--sample-length", "10"])
    assert code == 0, err
    # no validation, so no best.pt: the run's last.pt is what export takes
    reason = (f"no validation figures: the run of {made['noval'] / 'last.pt'} held out no val split "
              "(val_fraction 0): train with --val-fraction 0.1 (for example) to get one, or "
              "evaluate a file with --text FILE")
    assert f"charlm: warning: {reason}\n" in err
    assert json.loads((out / "config.json").read_text())["evaluation"] is None
    meta, body = card_parts(out)
    assert "model-index" not in meta
    assert f"Not measured when this folder was made: {reason}." in body


def test_a_folder_whose_training_is_null_is_exported_again(runs, exported, tmp_path):
    """read_config takes "training": null (the facts are optional); export of such a folder
    used to stop on a TypeError."""
    from charlm.about import __version__

    folder = copy_folder(exported["gru"][0], tmp_path)
    edit_config(folder, lambda c: c.update(training=None))
    out = tmp_path / "again"
    code, stdout, err = run_main(["export", str(folder), "--out", str(out), "--sample-length", "5"])
    assert code == 0, err
    assert (f"charlm: warning: no validation figures: {folder} holds no training "
            "configuration, so its splits cannot be rebuilt; evaluate a file with --text FILE\n"
            ) in err
    config = json.loads((out / "config.json").read_text())
    assert config["training"] == {"charlm_version": __version__, "train_config": None,
                                  "corpus": None}
    assert config["evaluation"] is None


def test_exports_figures_are_computed_without_tf32_as_evals_are(runs, tmp_path, monkeypatch):
    """On an Ampere GPU, TF32 would change the card's figures from eval perplexity's."""
    from charlm.inference import export

    calls, real = [], export.perplexity_of
    monkeypatch.setattr(export, "set_tf32", lambda enabled: calls.append(("tf32", enabled)))

    def scored(*args, **kwargs):
        calls.append("perplexity")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "perplexity_of", scored)
    code, _, err = run_main(["export", str(runs["gru"]), "--out", str(tmp_path / "share"),
                             "--sample-length", "5"])
    assert code == 0, err
    assert calls == [("tf32", False), "perplexity"]


# --- refusals -------------------------------------------------------------------------------------


class Touch:
    """Unpickles as a call to Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_hostile_and_damaged_checkpoints_are_refused_as_generate_refuses_them(runs, tmp_path):
    marker = tmp_path / "MARKER"
    hostile = tmp_path / "hostile.pt"
    torch.save({**ckpt_of(runs["gru"]), "model_config": Touch(marker)}, hostile)
    nan = ckpt_of(runs["gru"])
    nan["model"]["head.weight"][0, 0] = math.nan
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for bad in (hostile, tmp_path / "nan.pt", tmp_path / "text.pt"):
        code, _, refused = run_main(["generate", "--checkpoint", str(bad), "--length", "5"])
        assert code == 1 and refused.startswith(f"charlm: error: {bad}"), refused
        assert run_main(["export", str(bad), "--out", str(tmp_path / "out")]) == (1, "", refused)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pt", "nan.pt", "text.pt"]


def rewrite_weights(folder: Path, change) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


V = "{V}"
FOLDER_EDITS = {
    "shorter-bias": (lambda f: rewrite_weights(f, lambda w: w.update({"head.bias": w["head.bias"][:-1]})),
                     "{w}: tensor head.bias has shape ({V-1},) but the model of {c} needs ({V},); " + APART),
    "missing-tensor": (lambda f: rewrite_weights(f, lambda w: w.pop("head.weight")),
                       "{w} lacks tensor head.weight, which the model of {c} needs; " + APART),
    "extra-tensor": (lambda f: rewrite_weights(f, lambda w: w.update({"rnn.weight_ih_l1": torch.zeros(1)})),
                     "{w} holds tensor rnn.weight_ih_l1, which the model of {c} does not have; " + APART),
    "integer-tensor": (lambda f: rewrite_weights(f, lambda w: w.update({"head.bias": w["head.bias"].long()})),
                       "{w}: tensor head.bias is I64, not floating point; the folder is damaged"),
    "nan-weight": (lambda f: rewrite_weights(f, lambda w: w["head.weight"].__setitem__((0, 0), math.nan)),
                   "{w}: tensor head.weight holds NaN or infinity; export the model again from a good checkpoint"),
    "hidden-edited": (lambda f: edit_config(f, lambda c: c["model"].update(hidden=12)),
                      "{w}: tensor head.weight has shape ({V}, 16) but the model of {c} needs "
                      "({V}, 12); " + APART),
    "not-safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04K\x01."),
                        "{w} is not a readable safetensors file (Error while deserializing header: "
                        "header too small); the folder is damaged: export it again"),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(),
                   "{w} does not exist; the folder is incomplete: export it again"),
    "vocab-edited": (lambda f: edit_config(f, lambda c: c["vocab"].update(tokens=c["vocab"]["tokens"][:-1], counts=[])),
                     "{c}: its vocabulary has {V-1} tokens but its model says vocab_size {V}; the "
                     "folder is damaged or was edited"),
    "cell-unknown": (lambda f: edit_config(f, lambda c: c["model"].update(cell="transformer")),
                     "{c}: its model is invalid: cell must be one of rnn, gru, lstm, mingru, minlstm; got 'transformer'"),
    "newer-key": (lambda f: edit_config(f, lambda c: c["model"].update(tie_magic=True)),
                  "{c}: its model has unknown keys ['tie_magic']; it was written by a newer charlm: "
                  "upgrade charlm to load it"),
    "key-missing": (lambda f: edit_config(f, lambda c: c["model"].pop("layers")),
                    "{c}: its model lacks ['layers']; the folder is damaged"),
    "newer-version": (lambda f: edit_config(f, lambda c: c.update(version=2)),
                      "{c} is model folder format version 2, newer than this charlm reads (1); "
                      "upgrade charlm"),
    "not-json": (lambda f: (f / "config.json").write_text("{"),
                 "{c} is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                 "column 2 (char 1)); the folder is damaged"),
    "foreign-json": (lambda f: (f / "config.json").write_text('{"architectures": ["GPT2"]}'),
                     "{c} is not a charlm model config (no \"format\": \"charlm-model\")"),
    "train-config-type": (lambda f: edit_config(f, lambda c: c["training"]["train_config"].update(hidden="many")),
                          "{c}: its 'train_config' entry has hidden = 'many', of the wrong type; the "
                          "file is damaged or was edited"),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", FOLDER_EDITS)
@pytest.mark.parametrize("command", [
    ["generate", "--length", "5", "--seed", "1", "--checkpoint", "{f}"],
    ["eval", "perplexity", "--text", "{text}", "--checkpoint", "{f}"],
    ["export", "{f}", "--out", "{out}"],
], ids=["generate", "eval", "export"])
def test_a_folder_whose_files_disagree_is_refused_naming_what(runs, exported, tmp_path, edit, command):
    folder = copy_folder(exported["gru"][0], tmp_path)
    change, message = FOLDER_EDITS[edit]
    change(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    vocab = ckpt_of(runs["gru"])["model_config"]["vocab_size"]
    args = [a.replace("{f}", str(folder)).replace("{text}", str(runs["text"]))
            .replace("{out}", str(tmp_path / "out")) for a in command]
    expected = (message.replace("{w}", str(folder / "model.safetensors"))
                .replace("{c}", str(folder / "config.json"))
                .replace("{V-1}", str(vocab - 1)).replace("{V}", str(vocab)))
    assert run_main(args) == (1, "", f"charlm: error: {expected}\n")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "out").exists()


def test_resume_refuses_an_exported_folder(exported):
    folder = exported["gru"][0]
    assert run_main(["train", "--resume", str(folder)]) == (1, "", (
        f"charlm: error: {folder} is an exported model: it holds the weights but no training "
        "state, so a run cannot continue from it; resume from the run directory it was exported "
        "from\n"))


def test_out_must_be_new_empty_or_an_earlier_export_with_force(runs, exported, tmp_path,
                                                               monkeypatch):
    run = str(runs["gru"])
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert run_main(["export", run, "--out", "."]) == (1, "", (
        "charlm: error: --out . is the current folder or holds it; export into a new or empty "
        "folder\n"))
    (tmp_path / "here").rmdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    assert run_main(["export", run, "--out", str(tmp_path / "file")]) == (1, "", (
        f"charlm: error: --out {tmp_path / 'file'} exists and is not a folder; choose another --out\n"))
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (notes / name).write_text(name)
    assert run_main(["export", run, "--out", str(notes)]) == (1, "", (
        f"charlm: error: --out {notes} already holds other files (a.txt, b.txt, c.txt, ...); "
        "export into a new or empty folder\n"))

    share = copy_folder(exported["lstm"][0], tmp_path)
    (tmp_path / "empty").mkdir()
    assert run_main(["export", run, "--out", str(share)]) == (1, "", (
        f"charlm: error: --out {share} already holds an exported model; pass --force to replace "
        "it, or choose another --out\n"))
    (share / "mine.txt").write_text("keep me")
    assert run_main(["export", run, "--out", str(share), "--force"])[0] == 1  # not only an export
    (share / "mine.txt").unlink()
    for out in (share, tmp_path / "empty"):
        code, _, err = run_main(["export", run, "--out", str(out), "--force", "--sample-length", "5"])
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["model"]["cell"] == "gru"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "lstm", "notes"]


def test_a_failed_export_leaves_nothing_behind(runs, exported, tmp_path, monkeypatch):
    from charlm.errors import CharlmError
    from charlm.inference import export

    def fail(facts):
        raise CharlmError("the card could not be written")

    monkeypatch.setattr(export, "model_card", fail)
    earlier = copy_folder(exported["lstm"][0], tmp_path)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    for args in (["--out", str(tmp_path / "new")], ["--out", str(earlier), "--force"]):
        code, stdout, err = run_main(["export", str(runs["gru"]), *args])
        assert (code, stdout) == (1, "")
        assert err.endswith("\ncharlm: error: the card could not be written\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lstm"]  # no staging folders left
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_no_runs_yet_and_bad_options(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "runs"))
    assert run_main(["export", "--out", str(tmp_path / "x")]) == (1, "", (
        f"charlm: error: no runs yet in {tmp_path / 'runs'}/: train one first with `charlm "
        "train`, or name one: charlm export RUN_DIR --out DIR\n"))
    assert run_main(["export", "--out", str(tmp_path / "x"), "--format", "gguf"]) == (2, "", (
        "charlm: error: --format must be one of safetensors, onnx; got 'gguf'\n"))
    code, _, err = run_main(["export"])
    assert code == 2 and "Missing option '--out'" in err and len(err.splitlines()) == 1


def test_a_gru_with_the_reset_gate_before_exports_and_generates_the_same_text(tmp_path):
    """--gru-reset before exists in the scratch implementation only: the folder's model config
    is read with it (and its weights shaped by it), not refused as a fused model."""
    made = train_runs(tmp_path, {"before": ["--layers", "1", "--gru-reset", "before",
                                            "--max-steps", "4"]})
    folder = tmp_path / "share"
    code, _, err = run_main(["export", str(made["before"]), "--out", str(folder)])
    assert code == 0, err
    from_ckpt, from_folder = both(["generate", "--prefix", "the ", "--length", "30", "--greedy"],
                                  made["before"], folder)
    assert from_folder["samples"] == from_ckpt["samples"]
