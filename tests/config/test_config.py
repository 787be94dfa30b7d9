"""The training configuration: every option declared once, and everything made from that one
declaration agrees with it (the command line, --help, config files, resume, the README)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from charlm.checks import Rule
from charlm.cli.train import launch_args, typed
from charlm.errors import UsageError
from charlm.config.train import OPTIONS, PRECISIONS, TrainConfig, default_of, fixed_on_resume
from charlm.config.build import build_config
from charlm.config.file import load_config_file, options_markdown, run_config_toml
from helpers import invoke

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_the_defaults_are_the_shipped_default_config():
    """`charlm train` with no --config trains configs/timemachine-gru.toml: the file's values are
    the defaults, or, where a default is None ("the corpus's own"), what the default corpus
    gives (charlm/data/corpora.toml)."""
    from charlm.data.corpus import DEFAULT_CORPUS, entry

    own = entry(DEFAULT_CORPUS)
    resolved = {"corpus": DEFAULT_CORPUS, "preprocessing": own.preprocessing,
                "sample_prefix": own.sample_prefix, "val_fraction": own.val_fraction,
                "test_fraction": own.test_fraction}
    from_file = build_config(load_config_file(REPO / "configs" / "timemachine-gru.toml"), {})
    defaults = TrainConfig()
    for name in OPTIONS:
        want = getattr(defaults, name)
        got = getattr(from_file, name)
        if want is None and name in resolved:
            want = resolved[name]
        if got is None and name in resolved:
            got = resolved[name]
        assert got == want, name


def configured(*args: str) -> TrainConfig:
    """The configuration `charlm train ARGS` would train with (the run itself not started)."""
    import charlm.cli.train as command

    seen = []

    def spy(group, given, config, *rest):
        seen.append(build_config(load_config_file(config) if config else {}, given))

    original, command._train = command._train, spy
    try:
        result = invoke("train", *args)
    finally:
        command._train = original
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid_and_round_trips_through_config(path, tmp_path):
    """--config FILE, then the run's config.toml of it, then --config that: the same config."""
    cfg = configured("--config", str(path))
    saved = tmp_path / "config.toml"
    saved.write_text(run_config_toml(cfg), encoding="utf-8")
    assert configured("--config", str(saved)) == cfg


def tmp_round_trip(cfg: TrainConfig) -> TrainConfig:
    """A config through run_config_toml (what a run's config.toml holds) and back."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_text(run_config_toml(cfg), encoding="utf-8")
        return build_config(load_config_file(path), {})


def test_a_runs_config_file_leaves_out_the_run_directory_and_what_the_cell_ignores():
    """A rerun makes its own run directory (the old one is a finished run: refused as busy);
    a GRU has no nonlinearity to set, an LSTM no reset placement, none the min cells' stack."""
    stack = {"residual", "norm", "ffn"}
    for cell, absent in (("gru", {"out", "nonlinearity", *stack}),
                         ("lstm", {"out", "nonlinearity", "gru_reset", *stack}),
                         ("rnn", {"out", "gru_reset", *stack})):
        cfg = build_config({}, {"cell": cell, "out": "runs/old"})
        keys = {k for table in tomllib.loads(run_config_toml(cfg)).values() for k in table}
        unset = {k for k in OPTIONS if getattr(cfg, k) is None}  # None: the default, left out
        assert unset >= {"corpus", "url", "sha256", "data_dir", "preprocessing", "sample_prefix"}
        assert keys == set(OPTIONS) - absent - unset, cell
        assert tmp_round_trip(cfg) == build_config({}, {"cell": cell})


@pytest.mark.parametrize("given, message", [
    ({"cell": "gru", "nonlinearity": "relu"},
     "--nonlinearity relu applies only to --cell rnn, not --cell gru; drop it or choose that cell"),
    ({"cell": "lstm", "gru_reset": "before"},
     "--gru-reset before applies only to --cell gru, not --cell lstm; drop it or choose that cell"),
    ({"cell": "lstm", "nonlinearity": "relu", "gru_reset": "before"},
     "--nonlinearity relu applies only to --cell rnn and --gru-reset before applies only to "
     "--cell gru, not --cell lstm; drop it or choose that cell"),
])
def test_options_that_do_not_apply_to_the_cell_are_refused_naming_them(given, message, tmp_path):
    with pytest.raises(UsageError) as err:
        build_config({}, given)
    assert str(err.value) == message
    path = tmp_path / "rnn.toml"  # a file's value, with the cell changed on the command line
    path.write_text('[model]\ncell = "rnn"\nnonlinearity = "relu"\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"^--nonlinearity relu applies only to --cell rnn, "):
        build_config(load_config_file(path), {"cell": "gru"})


def test_the_defaults_of_options_for_other_cells_are_no_reason_to_refuse(tmp_path):
    """The default nonlinearity (tanh) is not something a GRU run asked for, nor a file that
    writes every option out, as config.toml files of earlier versions did."""
    assert build_config({}, {"cell": "gru"}).cell == "gru"
    path = tmp_path / "all.toml"
    path.write_text('[model]\ncell = "lstm"\nnonlinearity = "tanh"\ngru_reset = "after"\n',
                    encoding="utf-8")
    assert build_config(load_config_file(path), {}).cell == "lstm"
    assert build_config({}, {"cell": "rnn", "nonlinearity": "relu"}).nonlinearity == "relu"


def test_sha256_is_checked_before_anything_runs():
    with pytest.raises(UsageError) as err:
        build_config({}, {"url": "http://127.0.0.1/a.txt", "sha256": "abc"})
    assert str(err.value) == ("--sha256 must be 64 hexadecimal digits (as sha256sum prints "
                              "them), got 'abc'")
    assert build_config({}, {"url": "http://127.0.0.1/a.txt", "sha256": "A" * 64}).sha256


def test_to_toml_writes_any_string_as_valid_toml():
    hostile = "a\rb\x1b[31mc\x7fd\"e'f\\g\nh\ttab \u2028 \U0001F600"
    cfg = build_config({}, {"sample_prefix": hostile, "text": ["x [1].txt", "ü.txt"]})
    text = run_config_toml(cfg)
    assert tomllib.loads(text)["run"]["sample_prefix"] == hostile
    assert tmp_round_trip(cfg).sample_prefix == hostile


def test_every_field_is_one_declared_option():
    panels = {"Data", "Model", "Optimisation", "Stopping", "Run"}
    assert set(OPTIONS) == set(TrainConfig.__dataclass_fields__)
    for name, meta in OPTIONS.items():
        assert meta.help and meta.panel in panels, name
        if meta.rule is not None and meta.rule.kind is not None and default_of(name) is not None:
            meta.rule.check(name, default_of(name))  # the default obeys its own rule
    assert PRECISIONS == OPTIONS["precision"].choices


def test_fixed_on_resume_are_the_options_that_define_the_model_or_its_data():
    assert set(fixed_on_resume()) == {
        "cell", "hidden", "layers", "embed", "nonlinearity", "gru_reset", "corpus", "text", "url",
        "preprocessing", "min_freq", "max_vocab", "max_tokens", "val_fraction", "test_fraction",
        "batch_size", "num_steps", "sampling", "optimizer", "seed", "tie_weights", "residual", "norm", "ffn",
        "init_from"}  # where a fine-tuned run started: its weights, not the resumed ones


def test_train_help_shows_every_option_with_its_default_and_choices():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = result.stdout
    lines = [m.start() for m in re.finditer(r"^  (?:-\w, )?--[\w-]+", text, re.M)]
    starts = {}
    for name in OPTIONS:  # where the option's own entry starts (its flag first on a line)
        found = re.search(rf"^  (?:-\w, )?{flag(name)}\b", text, re.M)
        assert found, name
        starts[name] = found.start()
    for name, start in starts.items():
        end = next((s for s in lines if s > start), len(text))
        part = " ".join(text[start:end].split())
        here, meta, default = name, OPTIONS[name], default_of(name)
        if meta.choices:
            assert f"[{'|'.join(meta.choices)}]" in part, here
        if meta.default_text:
            assert f"[default: ({meta.default_text})]" in part, here
        elif isinstance(default, bool):  # a --flag/--no-flag pair (help may wrap at its "-")
            shown = f"[default:{'' if default else 'no-'}{flag(name)[2:]}]"
            assert shown in "".join(part.split()), here
        elif default not in (None, []):
            assert f"[default: {default}]" in part, here


def test_readme_lists_every_option_as_declared():
    """The README's options table is made by options_markdown (scripts/options_table.py --write)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- options:start -->\n(.*?)<!-- options:end -->", readme, re.S)
    assert table is not None, "README.md has no options table markers"
    assert table[1] == options_markdown(), "run: python scripts/options_table.py --write"


@pytest.mark.parametrize("value", ["GRU", "Gru", "gru"])
def test_choices_ignore_case(value):
    assert build_config({}, {"cell": value}).cell == "gru"


def test_values_are_checked_with_one_wording_naming_where_the_value_came_from(tmp_path):
    """One wording (the Rule's), and the error names what the user wrote: the option typed, the
    config file's key and path, or (the Python API, a checkpoint) the field."""
    rule = "must be an integer in [1, 16777216], got 0"
    path = tmp_path / "c.toml"
    path.write_text("[model]\nhidden = 0\n", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_config_file(path)
    assert str(err.value) == f"key 'model.hidden' in config file {path} {rule}"
    with pytest.raises(UsageError) as err:
        build_config({}, {"hidden": 0})
    assert str(err.value) == f"hidden {rule}"
    result = invoke("train", "--hidden", "0", "--out", str(tmp_path / "r"))
    assert (result.exit_code, result.stderr) == (2, f"charlm: error: --hidden {rule}\n")
    result = invoke("train", "--config", str(path), "--out", str(tmp_path / "r"))
    assert (result.exit_code, result.stderr) == (
        2, f"charlm: error: key 'model.hidden' in config file {path} {rule}\n")


@pytest.mark.parametrize("args, line", [
    (["--cell", "gur"], "--cell must be one of rnn, gru, lstm; got 'gur' (did you mean gru?)"),
    (["--impl", "fuse"],
     "--impl must be one of auto, fused, scratch, fast; got 'fuse' (did you mean fused?)"),
    (["--optimizer", "lbfgs"], "--optimizer must be one of sgd, adam, adamw; got 'lbfgs'"),
    (["--time-budget", "soon"], "--time-budget must look like 90s, 5m, 1.5h or 1h30m; got 'soon'"),
    (["--corpus", "tinyshakspeare"],
     "unknown corpus 'tinyshakspeare': choose one of enwik8, python-docs, text8, timemachine, "
     "tinyshakespeare, or give a text file or URL (did you mean tinyshakespeare?)"),
])
def test_a_mistyped_option_is_named_with_the_choice_it_was_near(args, line, tmp_path):
    result = invoke("train", *args, "--out", str(tmp_path / "r"))
    assert (result.exit_code, result.stderr) == (2, f"charlm: error: {line}\n")


def test_a_config_files_value_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\ncell = "lsmt"\n[run]\ntime_budget = "soon"\n', encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_config_file(path)
    assert str(err.value) == (f"key 'model.cell' in config file {path} must be one of rnn, gru, "
                              "lstm; got 'lsmt' (did you mean lstm?)")
    path.write_text('time_budget = "soon"\n', encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_config_file(path)
    assert str(err.value) == (f"key 'time_budget' in config file {path} must look like 90s, 5m, "
                              "1.5h or 1h30m; got 'soon'")


BAD_VALUES = [
    ["train", "--cell", "gur"],
    ["train", "--hidden", "0"],
    ["train", "--time-budget", "soon"],
    ["train", "--corpus", "nosuch"],
    ["train", "--config", "{file}"],
    ["train", "run.toml"],
    ["generate", "--impl", "foo"],
    ["eval", "perplexity", "--impl", "foo"],
    ["generate", "--weights", "best"],
]


@pytest.mark.parametrize("args", BAD_VALUES, ids=lambda a: " ".join(a))
def test_a_bad_value_is_told_before_torch_is_imported(args, tmp_path):
    """What the command line says wrong is told at once: the error path never imports torch
    (which takes seconds), in a process of its own."""
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text("hidden = -1\n", encoding="utf-8")
    args = [a.replace("{file}", str(bad)) for a in args]
    probe = ("import sys\nfrom charlm.cli.app import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.stderr.startswith("charlm: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == "2 False\n"


@pytest.mark.parametrize("rule, value, message", [
    (Rule(kind=int, low=1), 0, "x must be an integer >= 1, got 0"),
    (Rule(kind=int, low=1), True, "x must be an integer >= 1, got True"),
    (Rule(kind=int, low=1), "3", "x must be an integer >= 1, got '3'"),
    (Rule(kind=float, low=0, high=1, high_open=True), 1.0, "x must be in [0, 1), got 1.0"),
    (Rule(kind=float, low=0, low_open=True), 0.0, "x must be a positive number, got 0.0"),
    (Rule(kind=float, low=0, low_open=True), float("inf"), "x must be a positive number, got inf"),
    (Rule(kind=float, low=0, high=1, low_open=True, high_open=True), 1, "x must be in (0, 1), got 1"),
    (Rule(choices=("a", "b")), "c", "x must be one of a, b; got 'c'"),
    (Rule(choices=("rnn", "gru", "lstm")), "GUR", "x must be one of rnn, gru, lstm; got 'GUR' "
                                               "(did you mean gru?)"),
])
def test_rules_say_what_they_allow(rule, value, message):
    with pytest.raises(UsageError) as err:
        rule.check("x", value)
    assert str(err.value) == message


def test_an_option_typed_on_the_command_line_overrides_the_file_even_at_its_default(tmp_path):
    """--embed 32 is the default, but typed, it still overrides the file's embed = 8."""
    path = tmp_path / "c.toml"
    path.write_text("[model]\nembed = 8\nhidden = 24\n", encoding="utf-8")
    cfg = configured("--config", str(path), "--embed", "32")
    assert (cfg.embed, cfg.hidden) == (32, 24)


def test_the_ranks_of_nproc_get_back_exactly_what_was_typed():
    """launch_args writes the typed options out again; parsed, they give the same options."""
    import typer

    from charlm.cli.app import app

    given = {"text": ["a.txt", "b c.txt"], "hidden": 16, "lr": 0.003, "time_budget": "0",
             "sample_prefix": "-dash first", "cell": "lstm"}
    args = launch_args(given, None, False, None, False, False)
    command = typer.main.get_command(app).commands["train"]
    ctx = command.make_context("train", args[1:])
    assert typed(ctx, {k: v for k, v in ctx.params.items() if k in OPTIONS}) == given


def test_a_source_on_the_command_line_replaces_the_files(tmp_path):
    """--config d2l-gru.toml (corpus = "timemachine") --text notes.txt trains on notes.txt."""
    d2l = load_config_file(REPO / "configs" / "d2l-gru.toml")
    cfg = build_config(d2l, {"text": ["notes.txt"]})
    assert (cfg.corpus, cfg.text, cfg.max_tokens) == (None, ["notes.txt"], 10000)
    url = build_config({"url": "http://x/a.txt", "sha256": "0" * 64}, {"corpus": "tinyshakespeare"})
    assert (url.corpus, url.url, url.sha256) == ("tinyshakespeare", None, None)
    with pytest.raises(UsageError, match="^give one corpus source, not a corpus name and --text$"):
        build_config({}, {"corpus": "timemachine", "text": ["a.txt"]})  # both typed: still refused


@pytest.mark.parametrize("file, typed, limits", [
    ({}, {}, (0, 0, "2m")),  # the defaults' limit
    ({}, {"max_steps": 5000}, (0, 5000, "0")),  # a typed limit replaces the defaults' limits
    ({}, {"epochs": 20}, (20, 0, "0")),
    ({"max_steps": 300}, {}, (0, 300, "0")),  # so does a file's
    ({"time_budget": "4m"}, {"max_steps": 100}, (0, 100, "4m")),  # the file's own limits stay
])
def test_limits_named_anywhere_replace_the_defaults_limits(file, typed, limits):
    cfg = build_config(file, typed)
    assert (cfg.epochs, cfg.max_steps, cfg.time_budget) == limits


def test_the_first_line_says_what_stops_the_run(tmp_path):
    from helpers import pydoc_text

    text = pydoc_text(tmp_path / "small.txt", 6000)
    result = invoke("train", "--text", str(text), "--hidden", "8", "--layers", "1",
                    "--batch-size", "4", "--num-steps", "8", "--max-steps", "3", "--impl", "fused",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("training: gru 1x8 (fused), ") and first.endswith(", until max_steps 3")
