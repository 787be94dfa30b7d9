"""minGRU and minLSTM through every command, as the GRU goes: tiny real runs of the trainer (with
averaged weights, RMSNorm and feed-forward blocks between them), then generate (greedy = the forward
pass a character at a time, the same draws in every implementation, beam), eval perplexity (the
exact single-stream pass), --dynamic, export (safetensors + card, ONNX step), resume and DDP."""

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

from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from charlm.inference.sample import without_unk
from charlm.artifacts.checkpoint import load_checkpoint
from charlm.inference.loading import load_model
from charlm.config.build import build_config
from charlm.training.trainer import Interrupted, Trainer
from helpers import pydoc_text, run_main, train_runs

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
RUNS = {  # hidden 16 (TINY): an embedding of 16 makes every mingru layer residual
    "mingru": ["--cell", "mingru", "--layers", "2", "--embed", "16", "--ffn", "0", "--ema", "0.9"],
    "minlstm": ["--cell", "minlstm", "--layers", "2", "--embed", "8", "--norm", "rms", "--ffn",
                "2", "--locked-dropout", "--dropout", "0.1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    made = train_runs(tmp_path_factory.mktemp("min"), RUNS, text_chars=20_000)
    sample = made["root"] / "eval.txt"
    sample.write_text(made["text"].read_text()[5000:6500])
    return {**made, "eval": sample}


@pytest.fixture(autouse=True)
def runs_env(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["root"] / "runs"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(runs["root"] / "cache"))


def cli(*args: str) -> dict:
    code, out, err = run_main([*args, "--json", "-q"])  # -q: not the line naming the model
    assert (code, err) == (0, ""), err
    return json.loads(out)


@torch.no_grad()
def log_prob(model: CharLM, prefix: list[int], continuation: list[int]) -> float:
    """log p(continuation | prefix) from one forward pass over the whole text (<unk> excluded)."""
    text = torch.tensor([prefix + continuation])
    logp = F.log_softmax(without_unk(model(text[:, :-1])[0]).double(), -1)
    return float(logp[0, len(prefix) - 1:].gather(-1, text[0, len(prefix):, None]).sum())


# --- generate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_greedy_text_is_the_forward_pass_one_character_at_a_time(runs, run):
    loaded = load_model(str(runs[run]), None, "cpu")  # the run's averaged weights, where it has them
    model, vocab = loaded.model, loaded.vocab
    ids = vocab.encode("the ").tolist()
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]))
        for _ in range(60):
            ids.append(int(without_unk(logits[0, -1]).argmax()))
            logits, state = model(torch.tensor([ids[-1:]]), state)
    got = cli("generate", "--checkpoint", str(runs[run]), "--prefix", "the ", "--greedy",
              "--length", "60")
    assert got["samples"] == [vocab.decode(ids[4:])]


@pytest.mark.parametrize("run", RUNS)
def test_every_implementation_draws_the_same_text(runs, run):
    args = ["generate", "--checkpoint", str(runs[run]), "--prefix", "in", "--length", "50",
            "--seed", "3", "--num-samples", "2", "--temperature", "0.8"]
    base = cli(*args)
    assert base["samples"][0] != base["samples"][1]
    for impl in ("scratch", "fused", "fast"):
        assert cli(*args, "--impl", impl)["samples"] == base["samples"]


@pytest.mark.parametrize("run", RUNS)
def test_a_beams_scores_are_the_forward_passs_and_beam_one_is_greedy(runs, run):
    args = ["generate", "--checkpoint", str(runs[run]), "--prefix", "for ", "--length", "12"]
    assert cli(*args, "--beam", "1")["samples"] == cli(*args, "--greedy")["samples"]
    found = cli(*args, "--beam", "4", "--num-samples", "4")
    loaded = load_model(str(runs[run]), None, "cpu")
    prefix = loaded.vocab.encode("for ").tolist()
    exact = [log_prob(loaded.model, prefix, loaded.vocab.encode(s).tolist())
             for s in found["samples"]]
    assert [s["log_prob"] for s in found["scores"]] == pytest.approx(exact, abs=1e-5)
    assert exact == sorted(exact, reverse=True)


# --- eval -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_eval_perplexity_is_one_forward_pass_over_the_whole_text(runs, run):
    """The exact pass reads 512-character windows, the state carried: one window of all 1,500
    characters, in the step equations, gives the same figure."""
    got = cli("eval", "perplexity", "--checkpoint", str(runs[run]), "--text", str(runs["eval"]))
    loaded = load_model(str(runs[run]), "scratch", "cpu")
    tokens = loaded.vocab.encode(runs["eval"].read_text()).long()
    with torch.no_grad():
        logits, _ = loaded.model(tokens[None, :-1])
    nats = F.cross_entropy(logits[0].double(), tokens[1:], reduction="mean").item()
    assert got["characters"] == 1499
    assert got["nats_per_char"] == pytest.approx(nats, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats), rel=1e-5)


@pytest.mark.parametrize("run", RUNS)
def test_eval_dynamic_at_learning_rate_zero_is_the_static_figure(runs, run):
    best = runs[run] / "best.pt"
    before = best.read_bytes()
    static = cli("eval", "perplexity", "--checkpoint", str(best), "--dynamic", "--dynamic-lr", "0",
                 "--dynamic-window", "20")
    assert static["dynamic"]["nats_per_char"] == pytest.approx(static["nats_per_char"], rel=1e-6)
    adapted = cli("eval", "perplexity", "--checkpoint", str(best), "--dynamic",
                  "--dynamic-window", "20", "--dynamic-lr", "0.001")
    assert math.isfinite(adapted["dynamic"]["nats_per_char"])
    assert adapted["dynamic"]["nats_per_char"] != adapted["nats_per_char"]
    assert best.read_bytes() == before


# --- export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(runs):
    for extra in ("onnxruntime", "onnxscript"):
        pytest.importorskip(extra, reason="the onnx extra: pip install 'charlm[onnx]'")
    done = {}
    for run in RUNS:
        out = runs["root"] / "share" / run
        code, stdout, err = run_main(["export", str(runs[run]), "--out", str(out), "--format",
                                      "onnx", "--json", "--sample-length", "20"])
        assert code == 0, err
        done[run] = out, json.loads(stdout)
    return done


@pytest.mark.parametrize("run", RUNS)
def test_the_exported_folder_gives_the_runs_figures_text_and_card(runs, exported, run):
    folder, result = exported[run]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    ckpt = load_checkpoint(runs[run] / "best.pt")
    assert config["model"] == {k: v for k, v in ckpt["model_config"].items() if k != "impl"}
    assert config["onnx"]["inputs"] == ["token", "h"]  # the state is h alone
    assert result["onnx_max_abs_difference"] < 1e-5
    name = {"mingru": "minGRU", "minlstm": "minLSTM"}[run]
    stack = ("residual connections, LayerNorm" if run == "mingru"
             else "residual connections, RMSNorm, feed-forward blocks 2x wide")
    assert f"| model | 2-layer {name}, 16 hidden units, {stack}, " in (folder / "README.md").read_text()
    for args in (["eval", "perplexity"],
                 ["generate", "--prefix", "the ", "--length", "40", "--seed", "5"]):
        a, b = (cli(*args, "--checkpoint", str(where)) for where in (runs[run], folder))
        for key in ("perplexity", "samples"):
            assert a.get(key) == b.get(key)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_the_onnx_step_of_a_bare_stack_gives_charlms_logits_over_300_characters(cell):
    """The exported runs above have the stacks with norms; this one has none, and one-hot input."""
    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'charlm[onnx]'")
    pytest.importorskip("onnxscript", reason="the onnx extra: pip install 'charlm[onnx]'")
    from charlm.artifacts.onnxstep import onnx_bytes, onnx_difference

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=30, cell=cell, hidden=12, layers=3, embed=0,
                               residual=False, norm="none")).eval()
    with torch.no_grad():  # larger gate weights: states that move
        for block in model.rnn.blocks:
            block.gates.weight.mul_(3)
    tokens = torch.randint(0, 30, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    assert onnx_difference(onnx_bytes(model), model, tokens, batch=3) < 1e-5


def test_the_onnx_sampler_writes_what_generate_writes(exported):
    folder = exported["minlstm"][0]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "onnx_generate.py"), str(folder),
                           "--prefix", "the ", "--greedy", "--length", "60"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    code, stdout, err = run_main(["generate", "--checkpoint", str(folder), "--prefix", "the ",
                                  "--greedy", "--length", "60", "-q"])
    assert (code, err) == (0, "") and done.stdout == stdout


# --- training: resume, averaged weights, two ranks ---------------------------------------------------


def tiny(text: Path, out: Path, **over):
    values = dict(text=[str(text)], cell="mingru", hidden=16, layers=3, embed=8, dropout=0.2,
                  ema=0.9, batch_size=4, num_steps=16, max_steps=30, warmup_steps=5,
                  time_budget="0", log_every=5, eval_every=10, checkpoint_every=10,
                  sample_length=20, out=str(out))
    return build_config({}, {**values, **over})


@pytest.mark.parametrize("cell, over", [("mingru", {}),
                                        ("minlstm", {"locked_dropout": True, "ffn": 2})])
def test_an_interrupted_run_resumes_bit_identical(runs, tmp_path, cell, over):
    from charlm.training.state import resolve_resume

    Trainer(tiny(runs["text"], tmp_path / "full", cell=cell, **over)).run()
    trainer = Trainer(tiny(runs["text"], tmp_path / "part", cell=cell, **over))

    def stop(t):
        if t.loop.step == 13:
            t.stop_signal.append("SIGINT")

    trainer.step_hook = stop
    with pytest.raises(Interrupted):
        trainer.run()
    again, resumed = resolve_resume({}, str(tmp_path / "part"))
    assert Trainer(again, resume=resumed).run()["steps"] == 30
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("full", "part"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert torch.equal(a["hidden"], b["hidden"])  # the carried state, h alone


def test_a_tiny_model_learns(runs, tmp_path):
    summary = Trainer(tiny(runs["text"], tmp_path / "learn", max_steps=80, dropout=0.0, ema=0.0,
                           lr=0.01, eval_every=80)).run()
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    assert train[-1] < train[0] - 0.5 and summary["steps"] == 80


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    pydoc_text(tmp_path / "small.txt", 30_000)
    args = ["train", "--text", str(tmp_path / "small.txt"), "--cell", "minlstm", "--hidden", "16",
            "--layers", "2", "--embed", "8", "--dropout", "0", "--batch-size", "4",
            "--num-steps", "16", "--schedule", "none", "--max-steps", "6", "--time-budget", "0",
            "--eval-every", "6", "--checkpoint-every", "6", "--sample-length", "10",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHARLM_RUNS_DIR": str(tmp_path / "runs"),
           "CHARLM_DATA_DIR": str(tmp_path / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for name, extra in (("two", ["--nproc", "2"]), ("one", [])):
        done = subprocess.run([sys.executable, "-m", "charlm", *args, *extra, "--out",
                               str(tmp_path / name)], capture_output=True, text=True, env=env,
                              timeout=240)
        assert done.returncode == 0, done.stderr
    one, two = (load_checkpoint(tmp_path / name / "last.pt") for name in ("one", "two"))
    assert two["world_size"] == 2
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], atol=1e-5, rtol=0)
    torch.testing.assert_close(two["hidden"], one["hidden"], atol=1e-5, rtol=0)
