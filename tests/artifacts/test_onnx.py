"""`charlm export --format onnx`: the one-character step in onnxruntime gives charlm's logits to
1e-5 over hundreds of characters for every cell, and scripts/onnx_generate.py (onnxruntime and the
standard library, no torch) writes the text `charlm generate --greedy` writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'charlm-rnn[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install 'charlm-rnn[onnx]'")

from charlm.model.config import ModelConfig  # noqa: E402
from charlm.model.lm import CharLM  # noqa: E402
from charlm.artifacts.onnxstep import onnx_bytes, onnx_difference  # noqa: E402
from helpers import run_main, train_runs  # noqa: E402

# Slow (ONNX export and onnxruntime sessions): left out of `pytest -m "not slow"`.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "onnx_generate.py"


@pytest.mark.parametrize("cell, impl, extra, scale", [
    ("rnn", "fused", {"nonlinearity": "relu", "embed": 0}, 1),  # relu: larger weights explode
    ("rnn", "fused", {}, 3),
    ("gru", "fast", {}, 3),
    ("gru", "scratch", {"gru_reset": "before", "embed": 0}, 3),
    ("lstm", "fused", {}, 3),
    ("gru", "fused", {"tie_weights": True, "weight_drop": 0.3, "locked_dropout": True,
                      "dropout": 0.2, "embed_dropout": 0.1}, 2),  # tied through a projection
], ids=["rnn-relu", "rnn-tanh", "gru", "gru-reset-before", "lstm", "gru-awd"])
def test_the_onnx_step_gives_charlms_logits_over_300_characters(cell, impl, extra, scale):
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 30, "cell": cell, "hidden": 24, "layers": 2,
                            "embed": 8, "impl": impl, **extra})
    model = CharLM(config).eval()
    with torch.no_grad():  # larger weights than at initialisation: states that move
        for p in model.parameters():
            p.mul_(scale)
    tokens = torch.randint(0, 30, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    assert onnx_difference(onnx_bytes(model), model, tokens, batch=3) < 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    made = train_runs(tmp_path_factory.mktemp("onnx"), {
        "lstm": ["--cell", "lstm", "--layers", "2", "--embed", "8"]})
    out = made["root"] / "share"
    code, stdout, err = run_main(["export", str(made["lstm"]), "--out", str(out), "--format",
                                  "onnx", "--json", "--sample-length", "20"])
    assert code == 0, err
    return out, json.loads(stdout), err


def test_export_writes_and_checks_the_step(folder):
    out, result, err = folder
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["onnx"] == {"file": "model.onnx", "inputs": ["token", "h", "c"],
                              "outputs": ["logits", "h_next", "c_next"], "opset": 18}
    assert result["onnx_max_abs_difference"] < 1e-5
    assert (f"charlm: checked model.onnx with onnxruntime: 64 characters, largest logit "
            f"difference {result['onnx_max_abs_difference']:.1e}\n") in err
    card = (out / "README.md").read_text()
    assert '- "onnx"' in card and "python scripts/onnx_generate.py share --prefix" in card


def sampler(args: list[str]) -> subprocess.CompletedProcess:
    """scripts/onnx_generate.py with torch (and charlm) made impossible to import."""
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = sys.modules['charlm'] = None\n"
            f"sys.argv = ['onnx_generate.py', *{args!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("prefix", ["First Citizen", ""])
def test_the_sampler_writes_greedy_generates_text_without_torch(folder, prefix):
    out = folder[0]
    done = sampler([str(out), "--prefix", prefix, "--greedy", "--length", "150"])
    assert (done.returncode, done.stderr) == (0, "")
    code, stdout, err = run_main(["generate", "--checkpoint", str(out), "--prefix", prefix,
                                  "--greedy", "--length", "150", "-q"])
    assert (code, err) == (0, "")
    assert done.stdout == stdout


def test_the_sampler_reads_and_writes_a_byte_level_model_as_generate_does(tmp_path_factory):
    """--preprocessing bytes: the prefix goes in as its UTF-8 bytes (bytes the training text
    never had included: a byte-level vocabulary holds every byte) and the drawn bytes come out
    as text, as `charlm generate` writes them."""
    made = train_runs(tmp_path_factory.mktemp("onnx-bytes"), {
        "bytes": ["--preprocessing", "bytes", "--embed", "8"]})
    out = made["root"] / "share"
    code, _, err = run_main(["export", str(made["bytes"]), "--out", str(out), "--format", "onnx",
                             "--sample-length", "20"])
    assert code == 0, err
    prefix = "Caf\u00e9 na\u00efve, the"
    done = sampler([str(out), "--prefix", prefix, "--greedy", "--length", "120"])
    assert (done.returncode, done.stderr) == (0, "")
    code, stdout, err = run_main(["generate", "--checkpoint", str(out), "--prefix", prefix,
                                  "--greedy", "--length", "120", "-q"])
    assert (code, err) == (0, "")  # no <unk>: é and ï are bytes the text never had
    assert done.stdout == stdout
    assert done.stdout.startswith(prefix)


def test_the_sampler_draws_reproducibly_from_the_vocabulary(folder):
    out = folder[0]
    tokens = json.loads((out / "config.json").read_text())["vocab"]["tokens"]
    runs = [sampler([str(out), "--length", "200", "--seed", str(s), "--temperature", "0.8",
                     "--top-k", "10"]).stdout for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    text = runs[0].rstrip("\n").replace("<unk>", "")
    assert set(text) <= set(tokens)


def test_the_sampler_refuses_a_folder_without_onnx(tmp_path):
    (tmp_path / "config.json").write_text('{"format": "charlm-model"}')
    done = sampler([str(tmp_path)])
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"onnx_generate.py: error: {tmp_path} holds no model exported with --format onnx "
        "('onnx')")


def test_a_missing_extra_is_named_and_nothing_is_written(folder, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "share"
    assert run_main(["export", str(folder[0]), "--out", str(out), "--format", "onnx"]) == (
        1, "", "charlm: error: --format onnx needs onnxscript: install the onnx extra with pip "
               "install 'charlm-rnn[onnx]'\n")
    assert not out.exists()
