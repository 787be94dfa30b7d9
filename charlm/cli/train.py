"""`charlm train`: parse, check, hand over to the trainer.

The options of a run's configuration are not written here: `options()` makes one Typer option
per field of `charlm.config.train.TrainConfig` (its flag, default, choices, help and panel come
from that one declaration). This module adds what is not part of a run's configuration: the
resume target, --config, --resume, --nproc, --json, -q. Which options the user typed comes from
Click (`ctx.get_parameter_source`), so every option can show its real default in --help.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from charlm.cli.command import Command
from charlm.config.train import MODEL, OPTIONS, RUN, base_type, default_of
from charlm.config.build import check_typed
from charlm.errors import CharlmError, UsageError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def options() -> list[inspect.Parameter]:
    """One keyword-only Typer parameter per TrainConfig field."""
    params = []
    for name, meta in OPTIONS.items():
        base, default = base_type(name), default_of(name)
        decls = [flag(name)] + ([meta.short] if meta.short else [])
        if typing.get_origin(base) is list:
            annotation, default = Optional[list[str]], None
        else:
            annotation = Optional[base] if default is None else base
        if base is bool:
            decls = [f"{flag(name)}/--no-{flag(name)[2:]}"]
        shown: Any = meta.default_text if meta.default_text else default not in (None, [])
        help_text = meta.help
        if meta.rule is not None and not meta.choices and meta.rule.kind not in (None, bool):
            help_text = f"{help_text} ({meta.rule.describe()})"
        metavar = f"[{'|'.join(meta.choices)}]" if meta.choices else meta.metavar
        if meta.bare is not None:
            metavar = "[DIR]"
        info = typer.Option(
            default, *decls, help=help_text, rich_help_panel=meta.panel, show_default=shown,
            metavar=metavar,
        )
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    return params


def bare_values(args: list[str]) -> list[str]:
    """`--tensorboard` given without a value (last, or before another option) becomes
    `--tensorboard=<its bare value>`: Click has no options whose value may be left out."""
    bare = {flag(name): meta.bare for name, meta in OPTIONS.items() if meta.bare is not None}
    out = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in bare and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out[i] = f"{arg}={bare[arg]}"
    return out


class TrainCommand(Command):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_values(args))


def typed(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The configuration options the user typed (or set through the environment)."""
    given = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given[name] = list(value) if isinstance(value, (list, tuple)) else value
    return given


def train(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT]", help="With --resume: the run directory or checkpoint to continue (default: the latest run).", show_default=False),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config file (configs/*.toml); options given here override it.", rich_help_panel=RUN, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue a run exactly where it stopped: --resume (latest run), --resume RUN_DIR or --resume FILE.pt.", rich_help_panel=RUN),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train data-parallel on N processes here (one GPU each with CUDA); --batch-size is the global batch. Like torchrun --standalone --nproc-per-node N.", rich_help_panel=RUN, show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout.", rich_help_panel=RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors and the summary only).", rich_help_panel=RUN),
    bidirectional: bool = typer.Option(False, "--bidirectional", help="Refused: a bidirectional layer reads the characters it must predict.", rich_help_panel=MODEL),
    **values: Any,
) -> None:
    """Train a character-level language model.

    Examples: charlm train --cell gru --time-budget 5m; charlm train --config
    configs/shakespeare-gru.toml --corpus tinyshakespeare; charlm train --resume
    """
    if bidirectional:
        raise UsageError(
            "--bidirectional is not supported: a bidirectional layer reads the characters it is "
            "asked to predict, so it cannot be a language model"
        )
    given = typed(ctx, values)
    check_typed(given)
    if not resume and "WORLD_SIZE" not in os.environ:
        configure(config, given, resume, target)  # every value checked before torch loads
    if nproc is not None and nproc != 1:
        if nproc < 1:
            raise UsageError(f"--nproc must be >= 1, got {nproc}")
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--nproc starts its own processes; drop it when running under torchrun")
        from charlm.training.launch import launch

        raise typer.Exit(launch(nproc, launch_args(given, config, resume, target, json_out, quiet)))
    from charlm.training import distributed

    group = distributed.from_env(given.get("device"))
    try:
        _train(group, given, config, resume, target, json_out, quiet)
    except CharlmError as exc:
        if group.rank and getattr(exc, "on_every_rank", False):
            raise typer.Exit(exc.exit_code) from None  # rank 0 reports it
        if group.rank:
            exc.args = (f"rank {group.rank}: {exc}",)
        raise
    except RuntimeError as exc:
        if not distributed.peer_lost(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CharlmError(
            f"rank {group.rank}: lost contact with another process of the run, which stopped or "
            f"crashed (see its own output): {first}"
        ) from None
    finally:
        distributed.close()


_explicit = inspect.signature(train)
train.__signature__ = _explicit.replace(parameters=[  # type: ignore[attr-defined]
    p for p in _explicit.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
] + options())
train.__annotations__ = {**typing.get_type_hints(train),
                         **{p.name: p.annotation for p in options()}}


def launch_args(given: dict, config, resume: bool, target, json_out: bool, quiet: bool) -> list[str]:
    """The `charlm train` arguments, less --nproc, that each rank of `--nproc N` runs with."""
    args = ["train"]
    for key, value in given.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):
                args += [flag(key) if item else f"--no-{flag(key)[2:]}"]
            elif item is not None:
                args += [flag(key), str(item)]
    args += ["--config", str(config)] if config else []
    args += ["--resume"] if resume else []
    args += ["--json"] if json_out else []
    args += ["--quiet"] if quiet else []
    return args + ([str(target)] if target is not None else [])


def _meant(target: str) -> str:
    """What a stray argument probably meant: a config file, an option written as key=value
    (nanoGPT's habit), or the run to continue."""
    option = re.fullmatch(r"-*([A-Za-z][\w-]*)=(.*)", target, re.S)
    if option and option[1].replace("-", "_").lower() in OPTIONS:
        name = option[1].replace("-", "_").lower()
        return f"options are written {flag(name)} {shlex.quote(option[2])}"
    if target.lower().endswith(".toml"):
        return f"to train with a config file use --config {shlex.quote(target)}"
    return f"to continue a run use --resume {shlex.quote(target)}"


def configure(config, given: dict, resume: bool, target) -> tuple:
    """The run's checked config and, with --resume, the checkpoint it continues
    (`charlm.training.run.configure`, which `charlm.train` uses too). A new run's needs no torch
    (resume's reads the checkpoint)."""
    from charlm.training.run import configure as configure_run

    if target is not None and not resume:
        if config:
            from charlm.config.file import load_config_file

            load_config_file(config)  # a bad config file is the first thing to say
        raise UsageError(f"unexpected argument {target!r}; {_meant(target)}")
    return configure_run(given, config, resume=(target or "latest") if resume else None)


def _train(group, given: dict, config, resume: bool, target, json_out: bool, quiet: bool) -> None:
    """`charlm train` over `charlm.training.run`, the core `charlm.train` runs too: here the
    process group, the messages and the exit codes."""
    from charlm.training.display import TrainDisplay, summary_table
    from charlm.training.run import run_training
    from charlm.training.signals import Interrupted

    cfg, resumed = group.together(lambda: configure(config, given, resume, target))
    display = TrainDisplay(enabled=not quiet and group.is_main)  # one voice: rank 0's
    try:
        summary = run_training(cfg, resumed, display, group)
    except Interrupted as exc:
        if not group.is_main:
            raise typer.Exit(130) from None
        again = "charlm train" + (f" --nproc {group.world_size}" if group.active else "")
        if exc.checkpoint is None:
            sys.stderr.write(f"charlm: {exc.signame}: stopped before any checkpoint was saved\n")
            raise typer.Exit(130) from None
        again += f" --resume {shlex.quote(str(exc.checkpoint.parent))}"
        if exc.signame.endswith("(twice)"):
            sys.stderr.write(
                f"charlm: {exc.signame}: stopped mid-step without saving; the last checkpoint is "
                f"{exc.checkpoint}; resume with: {again}\n"
            )
        else:
            sys.stderr.write(
                f"charlm: {exc.signame}: saved {exc.checkpoint} at step {exc.step}; "
                f"resume with: {again}\n"
            )
        raise typer.Exit(130) from None
    if not group.is_main:
        return
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        from charlm.system.console import console

        console().print(summary_table(summary))
