"""generate, eval perplexity and export as a user meets them (issue 27): each names the model it
uses on stderr (items 3), eval's window is --chunk (item 5), --temperature 0 and --top-k 0 mean
greedy and off (item 7), and the help shows the values an option takes (item 8)."""

from __future__ import annotations

import datetime
import json
import re

import pytest
import torch

from helpers import invoke, train_runs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    return train_runs(tmp_path_factory.mktemp("commands"), {
        "gru": ["--layers", "2", "--embed", "8"]})


@pytest.fixture(autouse=True)
def runs_env(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["root"] / "runs"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(runs["root"] / "cache"))


def parameters(runs) -> int:
    ckpt = torch.load(runs["gru"] / "best.pt", weights_only=True)
    return sum(v.numel() for v in ckpt["model"].values())


def model_line(runs, verb: str = "using") -> str:
    """What the commands say about the run `gru`: its file, cell and size, parameters, corpus,
    how far and when it was trained."""
    path = runs["gru"] / "best.pt"
    saved = datetime.datetime.fromtimestamp(path.stat().st_mtime)
    return (f"charlm: {verb} {path}: gru 2x16, {parameters(runs):,} parameters, corpus small, "
            f"trained to step 20, saved {saved:%Y-%m-%d %H:%M}\n")


# --- item 3: which model ---------------------------------------------------------------------

COMMANDS = {
    "generate": ["generate", "--prefix", "the ", "--length", "10", "--seed", "1"],
    "eval": ["eval", "perplexity"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_names_the_model_it_uses_on_stderr(runs, command):
    result = invoke(*COMMANDS[command])
    assert result.exit_code == 0, result.output
    assert result.stderr == model_line(runs)
    assert str(runs["gru"]) not in result.stdout or command == "eval"  # stdout: the output


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_says_nothing_and_json_carries_the_model(runs, command):
    quiet = invoke(*COMMANDS[command], "-q")
    assert (quiet.exit_code, quiet.stderr) == (0, "")
    loud = invoke(*COMMANDS[command], "--json")
    assert loud.stderr == model_line(runs)
    path = runs["gru"] / "best.pt"
    saved = datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    ckpt = torch.load(path, weights_only=True)
    assert json.loads(loud.stdout)["model"] == {
        "path": str(path), "exported": False, "cell": "gru", "layers": 2, "hidden": 16,
        "parameters": parameters(runs), "vocab_size": ckpt["model_config"]["vocab_size"],
        "corpus": "small", "step": 20, "saved": saved.isoformat(timespec="seconds"),
        "weights": "raw"}


def test_export_names_the_model_and_q_silences_its_progress(runs, tmp_path):
    loud = invoke("export", "--out", str(tmp_path / "a"), "--json")
    assert loud.exit_code == 0, loud.output
    assert loud.stderr.splitlines(keepends=True)[0] == model_line(runs, "exporting")
    assert json.loads(loud.stdout)["model"]["path"] == str(runs["gru"] / "best.pt")
    quiet = invoke("export", "--out", str(tmp_path / "b"), "-q")
    assert (quiet.exit_code, quiet.stderr) == (0, "")


# --- item 5: --chunk -------------------------------------------------------------------------


def test_eval_takes_chunk_and_batch_size_is_a_hidden_alias_that_warns_once(runs):
    chunked = invoke("eval", "perplexity", "--chunk", "7", "--json", "-q")
    assert (chunked.exit_code, chunked.stderr) == (0, "")
    for alias in ("-b", "--batch-size"):
        old = invoke("eval", "perplexity", alias, "7", "--json", "-q")
        assert old.exit_code == 0
        assert old.stderr == ("charlm: warning: --batch-size of eval perplexity is now --chunk "
                              "(-b means sequences per batch in charlm train); use --chunk\n")
        assert json.loads(old.stdout) == json.loads(chunked.stdout)
    help_text = invoke("eval", "perplexity", "--help").stdout
    assert "--chunk" in help_text and "--batch-size" not in help_text and "-b," not in help_text


# --- item 7: 0 means greedy / off ------------------------------------------------------------


def test_temperature_zero_is_greedy(runs):
    zero = invoke("generate", "--prefix", "the ", "-n", "30", "--temperature", "0", "--json", "-q")
    greedy = invoke("generate", "--prefix", "the ", "-n", "30", "--greedy", "--json", "-q")
    assert zero.exit_code == 0, zero.output
    assert json.loads(zero.stdout)["samples"] == json.loads(greedy.stdout)["samples"]
    assert json.loads(zero.stdout)["settings"]["greedy"] is True


def test_top_k_zero_is_off(runs):
    off = invoke("generate", "--prefix", "the ", "-n", "30", "--seed", "3", "--top-k", "0", "-q")
    plain = invoke("generate", "--prefix", "the ", "-n", "30", "--seed", "3", "-q")
    assert off.exit_code == 0, off.output
    assert off.stdout == plain.stdout
    assert json.loads(invoke("generate", "-n", "5", "--seed", "3", "--json", "-q").stdout)[
        "settings"]["top_k"] == 0


def help_of(*command: str) -> str:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    return re.sub(r"\s+", " ", result.stdout)


def test_the_help_says_what_zero_means():
    text = help_of("generate")
    assert "0, or below 1e-8, is --greedy" in text
    assert re.search(r"--top-k INTEGER Draw only among the K likeliest characters \(0: off, all "
                     r"of them\)\. \[default: 0\]", text.replace("<int>", "INTEGER")), text


# --- item 8: choices, not <str> --------------------------------------------------------------


@pytest.mark.parametrize("command, shown", [
    (("generate",), ["--impl [auto|fused|scratch|fast]", "--device [auto|cpu|cuda|cuda:N|mps]",
                     "--weights [auto|ema|raw]"]),
    (("eval", "perplexity"), ["--split [train|val|test]", "--impl [auto|fused|scratch|fast]",
                              "--device [auto|cpu|cuda|cuda:N|mps]", "--weights [auto|ema|raw]"]),
    (("export",), ["--format [safetensors|onnx]", "--device [auto|cpu|cuda|cuda:N|mps]",
                   "--weights [auto|ema|raw]"]),
])
def test_options_with_fixed_values_show_them(command, shown):
    text = help_of(*command)
    for option in shown:
        assert option in text, option
    for option in ("--split", "--impl", "--format", "--weights", "--device"):
        assert f"{option} <str>" not in text
