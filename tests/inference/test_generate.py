"""`charlm generate`: d2l's predict_ch8 when greedy, exact Gumbel-max draws otherwise, and one-line
errors. The checkpoints are real: tiny runs of the real trainer, made once for this module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from charlm.artifacts.checkpoint import load_checkpoint
from charlm.cli.app import app
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM
from charlm.inference.sample import SampleSettings, generate, gumbel_noise
from charlm.data.vocab import Vocab
from helpers import train_runs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Two real runs: `raw` (GRU, embedding, raw text) and `d2l` (GRU, one-hot, d2l text)."""
    return train_runs(tmp_path_factory.mktemp("gen"), {
        "d2l": ["--layers", "1", "--embed", "0", "--preprocessing", "d2l"],
        "raw": ["--layers", "1", "--embed", "8"],
    })


@pytest.fixture(autouse=True)
def runs_env(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["root"] / "runs"))


def load(run_dir: Path, impl: str | None = None):
    ckpt = load_checkpoint(run_dir / "best.pt")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    if impl:
        cfg.impl = impl
    model = CharLM(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), Vocab.from_dict(ckpt["vocab"])


def invoke(*args: str):
    """`charlm generate ARGS -q`: stderr holds only warnings and errors (the line naming the
    model is tested in tests/cli/test_model_commands.py)."""
    return CliRunner().invoke(app, ["generate", *args, "-q"])


@torch.no_grad()
def predict_ch8(prefix: str, num_preds: int, model, vocab) -> str:
    """d2l's predict_ch8, written out: warm up on the prefix one character at a time, then argmax
    (over the real characters: <unk>, id 0, is never drawn)."""
    state = None
    outputs = [vocab.index(prefix[0])] if prefix else []
    if not prefix:  # no prefix: the first character comes from the zero state
        logits = model.head(torch.zeros(1, model.config.hidden))
        outputs.append(int(logits[0, 1:].argmax()) + 1)
        num_preds -= 1
    for y in prefix[1:]:
        _, state = model(torch.tensor([[outputs[-1]]]), state)
        outputs.append(vocab.index(y))
    for _ in range(num_preds):
        y, state = model(torch.tensor([[outputs[-1]]]), state)
        outputs.append(int(y.reshape(-1)[1:].argmax()) + 1)
    return "".join(vocab.tokens[i] for i in outputs)


# --- greedy = d2l --------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["raw", "d2l"])
def test_greedy_equals_d2l_predict_ch8(runs, run):
    model, vocab = load(runs[run])
    result = invoke("--checkpoint", str(runs[run]), "--prefix", "the ", "--greedy", "--length", "60")
    assert result.exit_code == 0, result.output
    assert result.stdout == predict_ch8("the ", 60, model, vocab) + "\n"
    assert result.stderr == ""


def test_greedy_without_prefix_starts_from_the_zero_state(runs):
    model, vocab = load(runs["raw"])
    result = invoke("--checkpoint", str(runs["raw"]), "--greedy", "--length", "40")
    assert result.stdout == predict_ch8("", 40, model, vocab) + "\n"


@pytest.mark.parametrize("impl", ["scratch", "fast", "auto"])
def test_other_implementations_give_the_same_text(runs, impl):
    base = invoke("--checkpoint", str(runs["raw"]), "--prefix", "def ", "--greedy", "--length", "80")
    other = invoke("--checkpoint", str(runs["raw"]), "--prefix", "def ", "--greedy", "--length", "80",
                   "--impl", impl)
    assert other.exit_code == 0, other.output
    assert other.stdout == base.stdout


def test_latest_run_is_the_default(runs):
    # the d2l run was trained first, raw last: `latest` points at raw
    model, vocab = load(runs["raw"])
    result = invoke("--prefix", "in", "--greedy", "--length", "30")
    assert result.stdout == predict_ch8("in", 30, model, vocab) + "\n"


# --- drawing -------------------------------------------------------------------------------------


def test_same_seed_same_text_other_seed_other_text(runs):
    args = ["--checkpoint", str(runs["raw"]), "--prefix", "The ", "--length", "120"]
    a, b, c = (invoke(*args, "--seed", s) for s in ("1", "1", "2"))
    assert a.exit_code == b.exit_code == c.exit_code == 0
    assert a.stdout == b.stdout and a.stdout != c.stdout
    model, vocab = load(runs["raw"])  # and it is what the library call draws with that seed
    ids = vocab.encode("The ").tolist()
    drawn = generate(model, ids, SampleSettings(length=120, seed=1))
    assert a.stdout == "The " + vocab.decode(drawn[0]) + "\n"


def test_batch_rows_equal_a_per_row_reference_with_the_same_noise(runs):
    """num_samples rows drawn as one batch equal rows drawn one by one through model(x, state)
    with the same Gumbel noise, temperature and top-k, with the top-k mask (and <unk>'s)
    written out."""
    model, vocab = load(runs["raw"])
    prefix = vocab.encode("class ").tolist()
    n, length, temperature, k = 3, 40, 0.7, 5
    settings = SampleSettings(length=length, temperature=temperature, top_k=k, num_samples=n)
    got = generate(model, prefix, settings, generator=torch.Generator().manual_seed(11))
    assert [len(row) for row in got] == [length] * n
    noise = list(gumbel_noise(torch.Generator().manual_seed(11), length, n, len(vocab)))
    with torch.no_grad():
        for row in range(n):
            logits, state = model(torch.tensor([prefix]))
            want = []
            for t in range(length):
                scaled = logits[0, -1] / temperature
                scaled[0] = float("-inf")  # <unk> is never drawn
                kth = sorted(scaled.tolist())[-k]
                scaled = torch.where(scaled < kth, torch.tensor(float("-inf")), scaled)
                want.append(int((scaled + noise[t][row]).argmax()))
                logits, state = model(torch.tensor([[want[-1]]]), state)
            assert got[row] == want
    assert got[0] != got[1]  # the rows draw independently


@pytest.mark.parametrize("settings", [
    SampleSettings(length=40, num_samples=4, seed=1),
    SampleSettings(length=40, greedy=True),
    SampleSettings(length=40, temperature=3.0, top_k=2, num_samples=2, seed=2),
    SampleSettings(length=40, top_p=0.3, num_samples=2, seed=3),
], ids=["sampled", "greedy", "top-k", "top-p"])
@pytest.mark.parametrize("prefix", ["", "class "])
def test_unk_is_never_drawn(runs, settings, prefix):
    """<unk> stands for characters the vocabulary left out; even where the model finds it the
    likeliest next token, text never shows it."""
    model, vocab = load(runs["raw"])
    with torch.no_grad():
        model.head.bias[0] = 100.0  # <unk> next, almost surely, whatever came before
    for row in generate(model, vocab.encode(prefix).tolist(), settings):
        assert len(row) == 40 and 0 not in row


def test_a_young_model_that_likes_unk_still_writes_characters(runs):
    """The 20-step `raw` run's likeliest token after "the " is <unk>; it is never printed."""
    result = invoke("--checkpoint", str(runs["raw"]), "--prefix", "the ", "--greedy",
                    "--length", "60")
    assert result.exit_code == 0, result.output
    assert "<unk>" not in result.stdout and len(result.stdout) == len("the ") + 60 + 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.6)])
def test_draws_follow_softmax_of_scaled_filtered_logits(runs, temperature, top_p):
    """First characters of 40,000 samples from the zero state: their frequencies match
    softmax(bias / T) over the real characters (<unk> is never drawn), restricted to the nucleus
    with top-p (well within 5 standard errors)."""
    model, vocab = load(runs["raw"])
    n = 40_000
    settings = SampleSettings(length=1, temperature=temperature, top_p=top_p, num_samples=n, seed=3)
    drawn = torch.tensor(generate(model, [], settings))[:, 0]
    logits = model.head.bias.detach().double() / temperature
    logits[0] = float("-inf")
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        assert keep.sum() < len(vocab)  # the nucleus is a real restriction here
        assert set(drawn.tolist()) <= set(torch.nonzero(keep).flatten().tolist())
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    freq = torch.bincount(drawn, minlength=len(vocab)).double() / n
    stderr = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * stderr + 1e-12).all()


def test_num_samples_json_structure(runs):
    args = ["--checkpoint", str(runs["raw"]), "--prefix", "for ", "--length", "25",
            "--num-samples", "3", "--seed", "7", "--temperature", "0.8", "--top-k", "10", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"prefix", "samples", "settings", "checkpoint", "model"}
    assert payload["prefix"] == "for "
    assert payload["checkpoint"] == str(runs["raw"] / "best.pt")
    assert payload["settings"] == {"length": 25, "temperature": 0.8, "top_k": 10, "top_p": 1.0,
                                   "greedy": False, "num_samples": 3, "seed": 7}
    model, vocab = load(runs["raw"])
    drawn = generate(model, vocab.encode("for ").tolist(),
                     SampleSettings(length=25, temperature=0.8, top_k=10, num_samples=3, seed=7))
    assert payload["samples"] == [vocab.decode(row) for row in drawn]  # continuations only
    plain = invoke(*args[:-1])  # the same draw as text: prefix + sample, blank line between
    assert plain.stdout == "\n\n".join("for " + s for s in payload["samples"]) + "\n"


def test_unseeded_draws_report_their_seed(runs):
    result = invoke("--checkpoint", str(runs["raw"]), "--prefix", "a", "--length", "30", "--json")
    payload = json.loads(result.stdout)
    seed = payload["settings"]["seed"]
    assert isinstance(seed, int)
    again = invoke("--checkpoint", str(runs["raw"]), "--prefix", "a", "--length", "30", "--json",
                   "--seed", str(seed))
    assert json.loads(again.stdout)["samples"] == payload["samples"]


# --- the prefix ----------------------------------------------------------------------------------


def test_prefix_goes_through_the_checkpoints_d2l_preprocessing(runs, tmp_path):
    model, vocab = load(runs["d2l"])
    result = invoke("--checkpoint", str(runs["d2l"]), "--prefix", "Time Traveller!", "--greedy",
                    "--length", "30", "--json")
    payload = json.loads(result.stdout)
    assert payload["prefix"] == "time traveller "
    assert "time traveller " + payload["samples"][0] == predict_ch8("time traveller ", 30, model, vocab)
    prefix_file = tmp_path / "prefix.txt"
    prefix_file.write_text("Time\nTraveller!", encoding="utf-8")
    from_file = invoke("--checkpoint", str(runs["d2l"]), "--prefix-file", str(prefix_file),
                       "--greedy", "--length", "30")
    assert from_file.stdout == predict_ch8("time traveller ", 30, model, vocab) + "\n"


def test_unknown_prefix_characters_become_unk_with_one_warning_line(runs):
    model, vocab = load(runs["raw"])
    assert "é" not in vocab and "€" not in vocab and "h" in vocab
    result = invoke("--checkpoint", str(runs["raw"]), "--prefix", "héllo€é", "--greedy",
                    "--length", "20", "--json")
    assert result.exit_code == 0
    assert result.stderr == (
        "charlm: warning: 2 prefix characters not in the model's vocabulary, read as <unk>: "
        "'é', '€'\n"
    )
    ids = [vocab.index(c) for c in "héllo€é"]
    assert ids[1] == ids[5] == ids[6] == 0
    drawn = generate(model, ids, SampleSettings(length=20, greedy=True))
    assert json.loads(result.stdout)["samples"] == [vocab.decode(drawn[0])]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1.5"], "--temperature must be a number >= 0 (0: greedy), got -1.5"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0: off), got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--length", "0"], "--length must be a positive integer, got 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--prefix", "a", "--prefix-file", "x.txt"], "give --prefix or --prefix-file, not both"),
])
def test_invalid_settings_are_usage_errors(runs, args, message):
    result = invoke("--checkpoint", str(runs["raw"]), *args)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"charlm: error: {message}\n"


def test_missing_or_foreign_checkpoint_and_missing_prefix_file(runs, tmp_path):
    result = invoke("--checkpoint", str(tmp_path / "nope"))
    assert (result.exit_code, result.stderr) == (
        1, f"charlm: error: checkpoint or run directory {tmp_path / 'nope'} does not exist\n")
    result = invoke("--checkpoint", str(tmp_path))
    assert (result.exit_code, result.stderr) == (
        1, f"charlm: error: run directory {tmp_path} holds no checkpoint (best.pt or last.pt)\n")
    result = invoke("--checkpoint", str(runs["raw"]), "--prefix-file", str(tmp_path / "p.txt"))
    assert (result.exit_code, result.stderr) == (
        1, f"charlm: error: --prefix-file {tmp_path / 'p.txt'} does not exist; check the path\n")
    other = tmp_path / "other.pt"  # a torch file, but not one of ours
    torch.save({"weights": torch.zeros(3)}, other)
    result = invoke("--checkpoint", str(other))
    assert (result.exit_code, result.stderr) == (
        1, f"charlm: error: {other} is not a charlm checkpoint (no 'charlm-checkpoint' header)\n")


def run_cli(*args: str, runs_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHARLM_RUNS_DIR": str(runs_dir), "OMP_NUM_THREADS": "1"}
    env.pop("CHARLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_subprocess_no_runs_yet_and_not_a_checkpoint(tmp_path):
    p = run_cli("generate", "--prefix", "a", runs_dir=tmp_path / "empty")
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == (
        f"charlm: error: no runs yet in {tmp_path / 'empty'}/: train one first with "
        "`charlm train`, or pass --checkpoint PATH\n"
    )
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint\n", encoding="utf-8")
    p = run_cli("generate", "--checkpoint", str(junk), runs_dir=tmp_path)
    assert (p.returncode, p.stdout) == (1, "")
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"charlm: error: {junk} ")


@pytest.mark.slow
def test_subprocess_streams_and_stops_quietly_when_the_reader_leaves(runs):
    """The first characters arrive while the process is still drawing; closing the pipe ends it
    with exit 0 and nothing on stderr."""
    env = {**os.environ, "CHARLM_RUNS_DIR": str(runs["root"] / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", "generate", "--checkpoint", str(runs["raw"]),
         "--prefix", "import ", "--length", "100000000", "--seed", "0", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    first = proc.stdout.read(12)
    assert first.startswith(b"import ") and len(first) == 12
    assert proc.poll() is None  # still drawing: the text streams
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


# --- numbers at their extremes; memory while streaming ---------------------------------------------


@pytest.mark.parametrize("extreme", [("--temperature", "1e-50"), ("--temperature", "1e-9"),
                                     ("--top-p", "1e-50")])
def test_a_temperature_or_nucleus_too_small_to_sample_draws_the_likeliest(runs, extreme):
    """logits / 1e-50 overflows float32 and a top-p of 1e-50 rounds to 0: both used to draw
    <unk> every time. Such settings amount to greedy decoding, and are drawn that way."""
    args = ("--checkpoint", str(runs["raw"]), "--prefix", "for ", "--length", "40")
    greedy, got = invoke(*args, "--greedy"), invoke(*args, *extreme, "--seed", "5")
    assert got.exit_code == 0, got.output
    assert got.stdout == greedy.stdout
    assert greedy.stdout.count("<unk>") < 40  # so "<unk> every time" could not pass for it


@pytest.mark.slow
def test_streaming_keeps_nothing_of_what_it_drew(runs):
    """While characters stream out, generate keeps none of them: its memory does not grow with
    --length (here: 20,000 steps allocate no more Python objects than 10 do)."""
    import tracemalloc

    model, vocab = load(runs["raw"])
    ids = vocab.encode("for ").tolist()
    seen: list[int] = []
    kept = generate(model, ids, SampleSettings(length=2000, seed=4))[0]
    assert generate(model, ids, SampleSettings(length=2000, seed=4),
                    on_step=lambda step: seen.append(step[0]), keep=False) == []
    assert seen == kept  # the same characters, streamed

    def growth(length: int, keep: bool) -> int:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        generate(model, ids, SampleSettings(length=length, seed=4), on_step=lambda s: None,
                 keep=keep)
        peak = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        return peak

    assert growth(20_000, keep=False) < growth(10, keep=False) + 64 * 1024
    assert growth(20_000, keep=True) > 1 << 20  # what keeping them costs
