"""Reading and checking a training configuration: defaults < config file < command line
(`build_config`), every option's Rule naming the key the user gave (`check_value`,
`check_typed`), the checks across options (`validate`, `check_cell_options`), durations
(`parse_duration`), and the ModelConfig a run trains (`model_config`). The options themselves
are declared in `charlm.config.train`. No torch here.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import fields
from typing import Any

from charlm.config.train import OPTIONS, TrainConfig, base_type, canonical, default_of, optional
from charlm.errors import UsageError
from charlm.model.config import ModelConfig, check_combination, check_tying


def parse_duration(value: str | int | float | None, key: str = "time_budget") -> float:
    """'90', '90s', '5m', '1.5h', '1h30m' -> seconds; '' / None / 0 -> 0 (no limit). Errors name
    `key` (see charlm.checks)."""
    if value in (None, "", 0):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd]?)", "", text).strip():
            raise UsageError(f"{key} must look like 90s, 5m, 1.5h or 1h30m; got {value!r}")
        unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
        seconds = sum(float(n) * unit[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"{key} must be a non-negative duration; got {value!r}")
    return seconds


def type_ok(name: str, value: Any) -> bool:
    """Whether `value` has the type of option `name` (a config file's or a checkpoint's value)."""
    if value is None:
        return optional(name)
    base = base_type(name)
    if typing.get_origin(base) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "time_budget":
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return isinstance(value, base)


SOURCES = ("corpus", "text", "url")  # where the text comes from: one of them
LIMITS = ("epochs", "max_steps", "time_budget")  # when a run stops: the first one reached


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < file values < command-line overrides (None means 'not given'), checked.

    Two groups of options are taken whole rather than key by key:
      * the text: a source named on the command line (--corpus, --text or --url) replaces the
        file's source (and its sha256), so `--config d2l-gru.toml --text notes.txt` trains on
        notes.txt;
      * the limits: once a file or the command line names any stopping limit, the defaults'
        limits (time_budget 2m) no longer apply; the limits named there do.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if any(k in overrides for k in SOURCES):
        file_values = {k: v for k, v in file_values.items() if k not in (*SOURCES, "sha256")}
    values = TrainConfig().to_dict()
    if any(k in file_values or k in overrides for k in LIMITS):
        values.update(epochs=0, max_steps=0, time_budget="0")
    values.update(file_values)
    values.update(overrides)
    for name, value in values.items():
        if base_type(name) is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            values[name] = canonical(name, value)
    if isinstance(values.get("time_budget"), (int, float)):
        values["time_budget"] = f"{values['time_budget']}s"
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every option's rule (naming the key), then the checks across options; checks that need
    the corpus happen when it is loaded."""
    for name in OPTIONS:
        check_value(name, getattr(cfg, name))
    if (cfg.val_fraction or 0.0) + (cfg.test_fraction or 0.0) >= 1.0:
        raise UsageError("val_fraction + test_fraction must leave some text for training")
    check_cell_options(cfg)
    check_combination(cfg.cell, cfg.impl, cfg.gru_reset)
    check_tying(cfg.tie_weights, cfg.embed)
    from charlm.data.corpus import check_source

    check_source(cfg.corpus, cfg.text, cfg.url, cfg.sha256)


def check_value(name: str, value: Any, key: str | None = None) -> None:
    """Option `name`'s value against its Rule (time_budget: its form), the error naming `key`:
    the field's name by default, `--cell` for what was typed, a config file's key and path."""
    key = key or name
    rule = OPTIONS[name].rule
    if rule is not None and not (value is None and optional(name)):
        rule.check(key, canonical(name, value))
    if name == "time_budget":
        parse_duration(value, key)


def check_typed(given: dict[str, Any]) -> None:
    """The values typed on the command line, each error naming its option (`--cell`). Nothing
    here imports torch, so a mistyped value is told before the trainer starts loading."""
    for name, value in given.items():
        check_value(name, value, "--" + name.replace("_", "-"))


def applies(name: str, cell: str) -> bool:
    """Whether option `name` means something for `cell` (--nonlinearity: the RNN only)."""
    return not OPTIONS[name].cells or cell in OPTIONS[name].cells


def given(name: str, value: Any) -> str:
    """An option as typed: --norm rms, --no-residual."""
    flag = name.replace("_", "-")
    return (f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool)
            else f"--{flag} {value}")


def check_cell_options(cfg: TrainConfig) -> None:
    """Options that do not apply to the cell are refused, naming them, when a file or the command
    line gave them a value (a value other than the default: the default tanh is not an RNN
    setting a GRU run asked for)."""
    misplaced = [name for name in OPTIONS
                 if not applies(name, cfg.cell) and getattr(cfg, name) != default_of(name)]
    if misplaced:
        said = " and ".join(f"{given(n, getattr(cfg, n))} applies only to --cell "
                            f"{' or '.join(OPTIONS[n].cells)}" for n in misplaced)
        raise UsageError(f"{said}, not --cell {cfg.cell}; drop it or choose that cell")


def model_config(cfg: TrainConfig, vocab_size: int, impl: str) -> ModelConfig:
    """The ModelConfig a run of `cfg` trains, with `impl` resolved for its device."""
    values = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)}
    return ModelConfig(**{**values, "vocab_size": vocab_size, "impl": impl}).validate()
