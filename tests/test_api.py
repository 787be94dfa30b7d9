"""The public API (`charlm.load`, `Model`, `charlm.train`, `RunResult`): the same text and figures
as the commands for the same checkpoint and seed, `import charlm` without torch, using a model
without the trainer, and `charlm.train` as `charlm train`. Real tiny runs of the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import charlm
from charlm.about import __version__
from charlm.errors import UsageError
from helpers import invoke, train_runs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """`gru` (embedding, raw text, a test split) and `bytes` (a byte-level LSTM)."""
    return train_runs(tmp_path_factory.mktemp("api"), {
        "bytes": ["--cell", "lstm", "--layers", "1", "--preprocessing", "bytes"],
        "gru": ["--layers", "2", "--embed", "8", "--test-fraction", "0.1"],
    })


@pytest.fixture(autouse=True)
def runs_env(runs, monkeypatch):
    monkeypatch.setenv("CHARLM_RUNS_DIR", str(runs["root"] / "runs"))
    monkeypatch.setenv("CHARLM_DATA_DIR", str(runs["root"] / "cache"))


def cli_json(*args: str) -> dict:
    result = invoke(*args, "--json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the package -----------------------------------------------------------------------------


def test_the_package_exports_the_api_lazily():
    assert charlm.__all__ == ["load", "Model", "train", "RunResult", "__version__"]
    assert charlm.__version__ == __version__
    from charlm.inference.model import Model, load
    from charlm.training.run import RunResult, train

    assert (charlm.load, charlm.Model, charlm.train, charlm.RunResult) == (
        load, Model, train, RunResult)
    with pytest.raises(AttributeError, match="module 'charlm' has no attribute 'nope'"):
        charlm.nope  # noqa: B018


def python(code: str) -> list:
    """What `code` prints as JSON on its last line, run in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def test_import_charlm_costs_no_torch():
    assert python("import json, sys, charlm; charlm.__version__; "
                  "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
                  "('torch', 'charlm'))))") == ["charlm", "charlm.about"]


def test_using_a_model_never_imports_the_trainer(runs):
    found = python(
        "import json, sys, charlm\n"
        f"m = charlm.load({str(runs['gru'])!r}, device='cpu')\n"
        "m.generate('the ', length=20, seed=1); m.perplexity(split='val')\n"
        "print(json.dumps([sorted(k for k in sys.modules if k.startswith('charlm.training')),"
        " 'torch' in sys.modules]))")
    assert found == [[], True]


# --- charlm.load: the commands' text and figures ---------------------------------------------


def test_repr_and_attributes(runs):
    model = charlm.load(runs["gru"], device="cpu")
    assert model.path == runs["gru"] / "best.pt"
    assert str(model.device) == "cpu"
    assert (model.config.cell, model.config.layers, model.config.hidden) == ("gru", 2, 16)
    assert len(model.vocab) == model.config.vocab_size
    assert repr(model) == (
        f"<charlm.Model gru 2x16 ({model.parameters:,} parameters), corpus small, vocabulary "
        f"{model.config.vocab_size}, on cpu, from {runs['gru'] / 'best.pt'}>")


@pytest.mark.parametrize("split", ["val", "test", "train"])
def test_perplexity_equals_eval_perplexity(runs, split):
    report = cli_json("eval", "perplexity", "--checkpoint", str(runs["gru"]), "--split", split)
    result = charlm.load(runs["gru"], device="cpu").perplexity(split=split)
    for key in ("perplexity", "nats_per_char", "bits_per_char", "unk_share"):
        assert abs(getattr(result, key) - report[key]) <= 1e-9, key
    assert (result.characters, result.unk_characters) == (report["characters"],
                                                          report["unk_characters"])
    assert result.to_dict() == {k: report[k] for k in result.to_dict()}


def test_perplexity_of_a_file_and_of_a_string(runs, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 3, encoding="utf-8")
    report = cli_json("eval", "perplexity", "--checkpoint", str(runs["gru"]), "--text", str(text),
                      "--chunk", "7")
    model = charlm.load(runs["gru"], device="cpu")
    from_file = model.perplexity(text=text, chunk=7)
    from_string = model.perplexity(text.read_text(encoding="utf-8"), chunk=7)
    assert from_file.to_dict() == {k: report[k] for k in from_file.to_dict()}
    assert abs(from_string.perplexity - report["perplexity"]) <= 1e-9
    assert (from_string.text, from_file.text) == (None, str(text))


@pytest.mark.parametrize("args, kwargs", [
    (["--seed", "3"], dict(seed=3)),
    (["--seed", "5", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"],
     dict(seed=5, temperature=0.7, top_k=5, top_p=0.9)),
    (["--greedy"], dict(greedy=True)),
    (["--temperature", "0"], dict(temperature=0)),
    (["--beam", "3"], dict(beam=3)),
], ids=["seed", "filtered", "greedy", "temperature-0", "beam"])
def test_generate_equals_charlm_generate(runs, args, kwargs):
    result = invoke("generate", "--checkpoint", str(runs["gru"]), "--prefix", "the ",
                    "--length", "40", "-q", *args)
    assert result.exit_code == 0, result.output
    model = charlm.load(runs["gru"], device="cpu")
    assert model.generate("the ", length=40, **kwargs) + "\n" == result.stdout
    if "beam" not in kwargs:
        assert "".join(model.stream("the ", length=40, **kwargs)) + "\n" == result.stdout


def test_several_samples_equal_charlm_generate(runs):
    result = invoke("generate", "--checkpoint", str(runs["gru"]), "--prefix", "in ", "-n", "30",
                    "--num-samples", "3", "--seed", "9", "-q")
    texts = charlm.load(runs["gru"], device="cpu").generate("in ", length=30, num_samples=3,
                                                            seed=9)
    assert isinstance(texts, list) and len(texts) == 3
    assert "\n\n".join(texts) + "\n" == result.stdout


def test_a_byte_level_model_streams_whole_characters(runs):
    model = charlm.load(runs["bytes"], device="cpu")
    pieces = list(model.generate_iter("né ", length=60, seed=4))
    assert pieces[0] == "né "
    assert "".join(pieces) == model.generate("né ", length=60, seed=4)
    result = invoke("generate", "--checkpoint", str(runs["bytes"]), "--prefix", "né ", "-n", "60",
                    "--seed", "4", "-q")
    assert result.stdout == "".join(pieces) + "\n"


def test_a_fresh_seed_is_reported_and_draws_the_same_text(runs):
    model = charlm.load(runs["gru"], device="cpu")
    drawn = model.draw("the ", length=30)
    assert isinstance(drawn.settings.seed, int)
    assert model.generate("the ", length=30, seed=drawn.settings.seed) == drawn.texts[0]


def test_bad_arguments_are_one_line_errors_before_any_work(runs):
    model = charlm.load(runs["gru"], device="cpu")
    with pytest.raises(UsageError, match=r"^--top-k must be >= 0 \(0: off\), got -1$"):
        model.generate(top_k=-1)
    with pytest.raises(UsageError, match=r"^--split must be one of train, val, test; got 'dev'$"):
        model.perplexity(split="dev")
    with pytest.raises(UsageError, match=r"^--chunk must be >= 1, got 0$"):
        model.perplexity(chunk=0)
    with pytest.raises(UsageError, match="^give --greedy or --beam, not both"):
        model.generate(beam=2, greedy=True)


# --- save_pretrained -------------------------------------------------------------------------


def test_save_pretrained_writes_the_export_folder_which_loads_back(runs, tmp_path):
    model = charlm.load(runs["gru"], device="cpu")
    out = tmp_path / "shared"
    exported = model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    back = charlm.load(out, device="cpu")
    assert back.path == out
    figures = back.perplexity(split="val")
    assert exported.evaluation == {"split": "val", **{k: v for k, v in figures.to_dict().items()
                                                       if k not in ("split", "text")}}
    assert json.loads((out / "config.json").read_text())["evaluation"] == exported.evaluation
    assert figures.to_dict() == {k: v for k, v in cli_json(
        "eval", "perplexity", "--checkpoint", str(out)).items() if k in figures.to_dict()}
    assert abs(figures.perplexity - model.perplexity(split="val").perplexity) <= 1e-9
    assert back.generate("the ", length=40, seed=2) == model.generate("the ", length=40, seed=2)
    # the same folder as `charlm export` writes, byte for byte but for the card's paths
    cli_out = tmp_path / "cli"
    assert invoke("export", str(runs["gru"]), "--out", str(cli_out), "-q").exit_code == 0
    for name in ("config.json", "model.safetensors"):
        assert (cli_out / name).read_bytes() == (out / name).read_bytes(), name


# --- charlm.train ----------------------------------------------------------------------------

OPTIONS = dict(hidden=16, batch_size=4, num_steps=8, max_steps=20, time_budget="0",
               eval_every=10, checkpoint_every=10, log_every=5, threads=1)


def test_train_returns_the_run_its_figures_and_rows(runs, tmp_path):
    rows = []
    run = charlm.train(text=runs["text"], out=tmp_path / "run", quiet=True, callback=rows.append,
                       **OPTIONS)
    assert run.run_dir == tmp_path / "run"
    assert (run.best_checkpoint, run.last_checkpoint) == (run.run_dir / "best.pt",
                                                          run.run_dir / "last.pt")
    assert run.best_checkpoint.is_file() and run.last_checkpoint.is_file()
    metrics = run.metrics()
    summary_row = metrics[-1]
    assert summary_row == {"kind": "summary", "step": 20, **run.summary}
    assert [r for r in metrics if r["kind"] != "summary"] == rows
    assert [r["kind"] for r in rows].count("train") == 4
    assert [r["step"] for r in rows if r["kind"] == "val"][:2] == [10, 20]
    best = min(r["loss"] for r in rows if r["kind"] == "val" and not r.get("whole_split"))
    assert run.summary["best_val_loss_estimate"] == best
    [exact] = [r for r in rows if r.get("val_kind") == "exact"]
    assert (run.summary["val_loss"], run.summary["val_ppl"]) == (exact["loss"], exact["ppl"])
    # the summary's exact figure is what charlm.load(...).perplexity gives for its checkpoint
    assert abs(run.load(device="cpu").perplexity(split="val").perplexity
               - run.summary["val_ppl"]) <= 1e-9
    assert run.config.hidden == 16 and run.config.text == [str(runs["text"].resolve())]
    model = run.load(device="cpu")
    assert model.path == run.best_checkpoint and isinstance(model, charlm.Model)


def test_train_is_charlm_train(runs, tmp_path):
    """The same options give the same run, figure for figure, from Python and the command."""
    api = charlm.train(text=str(runs["text"]), out=str(tmp_path / "api"), quiet=True, **OPTIONS)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    result = invoke("train", "--text", str(runs["text"]), "--out", str(tmp_path / "cli"), *flags,
                    "--json", "-q")
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    keys = ("steps", "epochs", "best_val_loss_estimate", "val_loss", "parameters", "impl")
    assert {k: api.summary[k] for k in keys} == {k: cli[k] for k in keys}
    assert (tmp_path / "api" / "samples.txt").read_text() == (
        tmp_path / "cli" / "samples.txt").read_text()


def test_train_takes_a_config_file_or_dict_under_the_options(runs, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text(f'text = ["{runs["text"]}"]\nhidden = 12\nmax_steps = 10\n', encoding="utf-8")
    common = dict(batch_size=4, num_steps=8, eval_every=5, log_every=5, quiet=True)
    run = charlm.train(config, hidden=8, out=tmp_path / "a", **common)
    assert (run.config.hidden, run.config.max_steps, run.summary["steps"]) == (8, 10, 10)
    run = charlm.train({"text": str(runs["text"]), "max_steps": 5}, out=tmp_path / "b", **common)
    assert (run.config.hidden, run.summary["steps"]) == (256, 5)


@pytest.mark.parametrize("options, message", [
    (dict(hiden=32), "unknown option 'hiden' for charlm.train; did you mean hidden?"),
    (dict(max_step=3), "unknown option 'max_step' for charlm.train; did you mean max_steps or "
                         "num_steps or max_tokens?"),
    (dict(wibble=1), "unknown option 'wibble' for charlm.train; the options are charlm "
                     "train's, with - written as _ (charlm train --help)"),
    (dict(hidden="32"), "option hidden for charlm.train must be an integer, got '32'"),
    (dict(cell="gur"), "'gur'"),
])
def test_train_refuses_unknown_options_and_wrong_types(tmp_path, options, message):
    with pytest.raises(UsageError) as info:
        charlm.train(text="x.txt", out=tmp_path / "r", quiet=True, **options)
    if message == "'gur'":  # the rule's own wording, as charlm train words it
        assert "cell" in str(info.value) and "'gur'" in str(info.value)
    else:
        assert str(info.value) == message
    assert not (tmp_path / "r").exists()


def test_train_shows_progress_unless_quiet(runs, tmp_path, capsys):
    charlm.train(text=runs["text"], out=tmp_path / "shown", **OPTIONS)
    err = capsys.readouterr().err
    assert f"run directory: {tmp_path / 'shown'}" in err
    assert "100%" in err and "val ppl" in err
    charlm.train(text=runs["text"], out=tmp_path / "quiet", quiet=True, **OPTIONS)
    assert capsys.readouterr() == ("", "")


def test_load_without_runs_says_how_to_name_one(tmp_path, monkeypatch):
    from charlm.errors import CharlmError

    monkeypatch.setenv("CHARLM_RUNS_DIR", str(tmp_path / "none"))
    with pytest.raises(CharlmError) as info:
        charlm.load()
    assert str(info.value) == (f"no runs yet in {tmp_path / 'none'}/: train one first with "
                               "`charlm train`, or give charlm.load a checkpoint, a run folder "
                               "or an exported folder")


def test_the_quality_script_evaluates_through_the_api_with_evals_figures(runs):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import quality
    finally:
        sys.path.remove(str(REPO / "scripts"))
    report = cli_json("eval", "perplexity", "--checkpoint", str(runs["gru"]), "--split", "val",
                      "--dynamic", "--dynamic-window", "20")
    figures = quality.eval_perplexity(runs["gru"], None, dict(os.environ),
                                      ["--dynamic-window", "20"])
    assert figures == {k: report[k] for k in figures}
    assert quality.result_figures({}, figures)["dynamic_perplexity"] == report["dynamic"][
        "perplexity"]
