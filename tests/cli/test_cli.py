"""The command line as a new user meets it: help, version and completion, suggestions for
near-misses, a closed pipe as a normal end, and a stderr that holds charlm's own lines only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import run_main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [[], ["data"], ["eval"]], ids=["charlm", "data", "eval"])
def test_a_bare_command_prints_its_help(args):
    """As `git` does: the help as --help prints it, not squashed into one error line."""
    code, out, err = run_main(args)
    assert (code, err) == (0, "")
    assert out == run_main([*args, "--help"])[1]
    assert out.startswith(f"Usage: charlm {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND")
    assert "\nCommands:\n" in out


COMMANDS = [["train"], ["generate"], ["eval", "perplexity"], ["export"], ["plot"],
            ["data", "list"], ["data", "download"], ["data", "add"], ["data", "info"]]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_help_names_values_as_a_user_reads_them(args):
    """No Python types (`<list[str]>`, `<list[Path]>`) and no Typer notation (`{name}`) in any
    command's help; arguments are named in capitals, as usage lines name them."""
    code, out, err = run_main([*args, "--help"])
    assert (code, err) == (0, "")
    assert not re.findall(r"<list\[|\{\w+\}|\[\[", out), out
    usage = out.splitlines()[0]
    assert re.fullmatch(rf"Usage: charlm {' '.join(args)} \[OPTIONS\]( [A-Z_|\[\].]+)*", usage)


@pytest.mark.parametrize("args, shown", [
    (["data", "add"], "Usage: charlm data add [OPTIONS] NAME FILE"),
    (["data", "download"], "Usage: charlm data download [OPTIONS] NAME"),
    (["plot"], "Usage: charlm plot [OPTIONS] [RUN_DIR]..."),
    (["train"], "Usage: charlm train [OPTIONS] [RUN_DIR|CHECKPOINT]"),
    (["plot"], "\n  RUN_DIR...  Run directories to overlay"),
    (["train"], "\n  --text <file> "),
    (["train"], "\n  --time-budget <duration> "),
    (["generate"], "\n  --impl [auto|fused|scratch|fast]"),
    (["eval", "perplexity"], "\n  --weights [auto|ema|raw]"),
])
def test_help_shows_choices_and_what_a_value_is(args, shown):
    assert shown in run_main([*args, "--help"])[1]


def test_help_and_readme_say_what_ema_and_beam_compute():
    """The semantics tests/model/test_regularisation.py (the EMA's ramp) and
    tests/inference/test_beam.py (scores over the characters less <unk>, renormalised) check
    are said where a user reads them."""
    def said(args):  # help wraps lines, at spaces and after hyphens
        return "".join(run_main([*args, "--help"])[1].split())

    def bare(text):
        return "".join(text.split())

    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert bare("After step t the decay is min(--ema, (1+t)/(10+t)), a warm-up ramp") in said(["train"])
    assert "`d = min(DECAY, (1 + t) / (10 + t))`: a warm-up ramp" in readme
    beam = ("scored by log-probability (natural log, per character; <unk> excluded and the other "
            "characters' probabilities renormalised, as when drawing)")
    assert bare(beam) in said(["generate"])
    assert ("Scores are natural logs of the model's probabilities with `<unk>` excluded and the "
            "other characters' probabilities renormalised") in readme


def test_version():
    from charlm.about import __version__

    assert run_main(["--version"]) == (0, f"charlm {__version__}\n", "")


def test_shell_completion_installs_and_completes(tmp_path, monkeypatch):
    """--install-completion (Typer's) writes the script for the user's shell; the script asks
    charlm itself, through _CHARLM_COMPLETE, for commands and options."""
    env = {**os.environ, "HOME": str(tmp_path)}
    # `; true` keeps bash as the parent process: that is how the shell is detected
    command = f'"{sys.executable}" -m charlm --install-completion; true'
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.stdout.startswith("bash completion installed in "), proc.stdout + proc.stderr
    script = tmp_path / ".bash_completions" / "charlm.sh"
    assert "_CHARLM_COMPLETE=complete_bash" in script.read_text()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()
    monkeypatch.setenv("_CHARLM_COMPLETE", "complete_bash")
    for words, cword, want in (("charlm tr", "1", "train"), ("charlm data in", "2", "info"),
                               ("charlm train --max-st", "2", "--max-steps")):
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", cword)
        assert run_main([]) == (0, f"{want}\n", ""), words


@pytest.mark.parametrize("argument, hint", [
    ("configs/d2l-gru.toml", "to train with a config file use --config configs/d2l-gru.toml"),
    ("my config.TOML", "to train with a config file use --config 'my config.TOML'"),
    ("max_steps=2", "options are written --max-steps 2"),
    ("sample_prefix=to be", "options are written --sample-prefix 'to be'"),
    ("runs/old", "to continue a run use --resume runs/old"),
    ("hidden_size=3", "to continue a run use --resume hidden_size=3"),  # no such option
])
def test_a_stray_argument_gets_the_suggestion_it_needs(argument, hint):
    code, out, err = run_main(["train", argument])
    assert (code, out, err) == (2, "", f"charlm: error: unexpected argument {argument!r}; {hint}\n")


@pytest.mark.parametrize("command", [["generate"], ["eval", "perplexity"]])
def test_a_wrong_weights_choice_is_a_usage_error_before_any_checkpoint_is_read(command, tmp_path):
    """--weights is checked like every choice option: exit 2, naming --weights, before the
    checkpoint (here missing) is looked for."""
    missing = tmp_path / "nosuch.pt"
    code, out, err = run_main([*command, "--checkpoint", str(missing), "--weights", "best"])
    assert (code, out, err) == (
        2, "", "charlm: error: --weights must be one of auto, ema, raw; got 'best'\n")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run / "run"


def charlm(*args: str, stdout=subprocess.PIPE, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "charlm", *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--help"], ["data", "list"], ["data", "info", "python-docs"], ["eval", "perplexity", "--json"],
    ["generate", "--length", "5", "--num-samples", "2"],
], ids=["click's help", "a rich table", "plain lines", "json", "samples printed once drawn"])
def test_a_closed_pipe_is_a_normal_end(args, tiny_checkpoint, tmp_path):
    """`charlm data info x | head -2`: the reader leaves; charlm ends quietly with 0, whoever
    was writing (`generate | head` while it streams: tests/inference/test_generate.py)."""
    if args[0] in ("eval", "generate"):  # -q: not the line naming the model on stderr
        args = [*args, "--checkpoint", str(tiny_checkpoint), "-q"]
    read, write = os.pipe()
    os.close(read)  # a reader that is already gone: the first write fails (EPIPE)
    try:
        proc = charlm(*args, stdout=write)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.slow
def test_a_closed_pipe_ends_training_normally_after_it_finished(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("the time machine " * 400, encoding="utf-8")
    read, write = os.pipe()
    os.close(read)
    try:
        proc = charlm("train", "--text", str(text), "--hidden", "8", "--layers", "1",
                      "--batch-size", "4", "--num-steps", "8", "--max-steps", "2", "-q",
                      "--impl", "fused",
                      "--out", str(tmp_path / "run"), stdout=write)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert (tmp_path / "run" / "last.pt").is_file()


def test_numpy_is_declared():
    """torch's wheels do not bring numpy, yet torch warns without it on import and the
    process group's exchange (Tensor.numpy) needs it: the README's install must bring it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[<>=!~ ;\[]", dep)[0] for dep in project["dependencies"]}
    assert "numpy" in names


@pytest.mark.slow
def test_library_warnings_stay_off_stderr(tiny_checkpoint, tmp_path):
    """Without numpy, `import torch` warns "Failed to initialize NumPy" on stderr: a library's
    line in a normal run, which charlm keeps off a user's stderr (-q or not); CHARLM_DEBUG=1
    shows it."""
    hidden = tmp_path / "no-numpy" / "numpy"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError('hidden by the test', name='numpy')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}
    ckpt = ["--checkpoint", str(tiny_checkpoint), "-q"]  # -q: not the line naming the model
    proc = charlm("generate", "--length", "5", *ckpt, env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    text = tmp_path / "small.txt"
    text.write_text("the time machine " * 400, encoding="utf-8")
    proc = charlm("train", "-q", "--text", str(text), "--hidden", "8", "--layers", "1",
                  "--batch-size", "4", "--num-steps", "8", "--max-steps", "2", "--impl", "fused",
                  "--out", str(tmp_path / "run"), env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = charlm("generate", "--length", "5", *ckpt, env={**env, "CHARLM_DEBUG": "1"})
    assert proc.returncode == 0 and "Failed to initialize NumPy" in proc.stderr


def test_one_cpu_thread_is_one_thread():
    import torch

    from charlm.system.devices import describe

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe(torch.device("cpu")) == "cpu (1 thread)"
        torch.set_num_threads(2)
        assert describe(torch.device("cpu")) == "cpu (2 threads)"
    finally:
        torch.set_num_threads(before)
