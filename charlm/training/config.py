"""Training configuration: one dataclass, loaded from TOML, overridden by command-line options.

Precedence: built-in defaults (the tuned `configs/timemachine-gru.toml`) < `--config FILE` <
command-line options. Keys are the dataclass field names; a file may group them in tables
(`[data]`, `[model]`, `[train]`, ...), which are flattened, so the table name is documentation.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from charlm.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "plateau")
SAMPLINGS = ("sequential", "random")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # data
    corpus: str | None = None  # a registered name; None: timemachine (python-docs fallback)
    text: list[str] = field(default_factory=list)  # local UTF-8 files instead of a named corpus
    url: str | None = None
    sha256: str | None = None
    data_dir: str | None = None
    preprocessing: str | None = None  # None: the corpus's own (d2l for timemachine, else raw)
    min_freq: int = 1
    max_vocab: int = 0  # 0: no limit
    max_tokens: int = 0  # d2l's knob: keep only the first N tokens; 0: all
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    # model
    cell: str = "gru"
    hidden: int = 256
    layers: int = 2
    embed: int = 32
    dropout: float = 0.2
    nonlinearity: str = "tanh"
    impl: str = "auto"
    gru_reset: str = "after"
    # optimisation
    batch_size: int = 64
    num_steps: int = 32
    sampling: str = "sequential"
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 100
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    clip: float = 1.0
    # stopping: whichever comes first; 0 / "" disables a limit
    epochs: int = 0
    max_steps: int = 0
    time_budget: str = "2m"
    # runtime
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    sample_prefix: str | None = None  # None: the corpus's own ("time traveller" for timemachine)
    sample_length: int = 200
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def parse_duration(value: str | int | float | None) -> float:
    """'90', '90s', '5m', '1.5h', '1h30m' -> seconds; '' / None / 0 -> 0 (no limit)."""
    if value in (None, "", 0):
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd]?)", "", text).strip():
            raise UsageError(
                f"time_budget must look like 90s, 5m, 1.5h or 1h30m; got {value!r}"
            )
        unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
        seconds = sum(float(n) * unit[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"time_budget must be a non-negative duration; got {value!r}")
    return seconds


def _type_ok(name: str, value: Any) -> bool:
    kind = FIELD_TYPES[name]
    if "list" in kind:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if value is None:
        return "None" in kind
    if kind.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("str"):
        return isinstance(value, str) or (name == "time_budget" and isinstance(value, (int, float)))
    return True


def _type_name(name: str) -> str:
    kind = FIELD_TYPES[name].replace(" | None", "")
    return {"int": "an integer", "float": "a number", "str": "a string"}.get(kind, "a list of strings")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config into a flat {key: value} dict, rejecting unknown keys and wrong types."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            where = f"{key}.{name}" if isinstance(value, dict) else name
            if name not in FIELD_TYPES:
                raise UsageError(
                    f"unknown key '{where}' in config file {path}; see 'charlm train --help' "
                    "for the keys (option names with - written as _)"
                )
            if isinstance(item, int) and not isinstance(item, bool) and "float" in FIELD_TYPES[name]:
                item = float(item)
            if not _type_ok(name, item):
                raise UsageError(
                    f"key '{where}' in config file {path} must be {_type_name(name)}, got {item!r}"
                )
            flat[name] = item
    return flat


def build_config(file_values: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < file values < command-line overrides (None means 'not given')."""
    values = TrainConfig().to_dict()
    values.update(file_values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("time_budget"), (int, float)):
        values["time_budget"] = f"{values['time_budget']}s"
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _positive(cfg: TrainConfig, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value < minimum:
            raise UsageError(f"{key} must be >= {minimum}, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Range checks that name the key; corpus-dependent checks happen when the data is loaded."""
    from charlm.model.lm import CELLS, GRU_RESETS, NONLINEARITIES

    choices = {
        "cell": CELLS,
        "nonlinearity": NONLINEARITIES,
        "gru_reset": GRU_RESETS,
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "sampling": SAMPLINGS,
        "precision": PRECISIONS,
        "impl": ("auto", "fused", "scratch", "fast"),
        "preprocessing": ("d2l", "lower", "raw", None),
    }
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        if value not in allowed:
            shown = ", ".join(a for a in allowed if a is not None)
            raise UsageError(f"{key} must be one of {shown}; got {value!r}")
    _positive(cfg, "hidden", "layers", "batch_size", "num_steps", "min_freq", "sample_length")
    _positive(cfg, "log_every", "eval_every", "checkpoint_every", "plateau_patience")
    _positive(cfg, "embed", "max_vocab", "max_tokens", "epochs", "max_steps", "warmup_steps",
              minimum=0)
    if not 0 <= cfg.seed < 2**63:
        raise UsageError(f"seed must be in [0, 2**63), got {cfg.seed}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"lr must be a positive number, got {cfg.lr}")
    if not cfg.weight_decay >= 0:
        raise UsageError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if not cfg.clip >= 0:
        raise UsageError(f"clip must be >= 0 (0 disables clipping), got {cfg.clip}")
    if not 0.0 < cfg.plateau_factor < 1.0:
        raise UsageError(f"plateau_factor must be in (0, 1), got {cfg.plateau_factor}")
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise UsageError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise UsageError("val_fraction + test_fraction must leave some text for training")
    if cfg.gru_reset == "before" and cfg.cell != "gru":
        raise UsageError("gru_reset before applies to --cell gru only")
    parse_duration(cfg.time_budget)
    sources = sum(bool(x) for x in (cfg.corpus, cfg.text, cfg.url))
    if sources > 1:
        raise UsageError("give one of --corpus, --text or --url, not several")
    if cfg.sha256 and not cfg.url:
        raise UsageError("--sha256 goes with --url")


def to_toml(values: dict[str, Any]) -> str:
    """Write a flat config dict as TOML (keys with value None are left out: they mean default)."""
    lines = ["# Resolved charlm training configuration; rerun with: charlm train --config THIS_FILE"]
    for key, value in values.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
