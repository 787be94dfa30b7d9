"""Config files: a TOML file read into options (`load_config_file`), a run's config.toml written
(`run_config_toml`, with tomli-w), and the README's table of options (`options_markdown`), all
made from the declarations in `charlm.config.train`.

    [model]               a file may group keys in tables; the table names are only for reading:
    cell = "gru"          {"cell": "gru", "hidden": 256} -> build_config(file_values, typed)
    hidden = 256
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from charlm.config.train import OPTIONS, TrainConfig, base_type, default_of
from charlm.config.build import applies, check_value, type_ok
from charlm.errors import UsageError
from charlm.text_safety import quoted, shown


def type_name(name: str) -> str:
    base = base_type(name)
    if typing.get_origin(base) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[base]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config into a flat {key: value} dict, rejecting unknown keys, wrong types and
    values out of range (each error names the file and the key)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:  # at most a MiB: <(...) works, /dev/zero cannot hang us
            data = fh.read((1 << 20) + 1)
        if len(data) > 1 << 20:
            raise UsageError(f"config file {path} is larger than 1 MiB; a config file is a few "
                             "lines of TOML")
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {shown(exc)}") from None
    except ValueError as exc:  # tomllib's int() of a number past Python's 4300 digits
        raise UsageError(f"config file {path} holds a value charlm cannot read: {shown(exc)}") \
            from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UsageError(f"config file {path} nests arrays or tables too deeply; a config file "
                         "is a few lines of TOML") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, item in items:
            where = f"{key}.{name}" if isinstance(value, dict) else name
            if name not in OPTIONS:
                raise UsageError(
                    f"unknown key '{shown(where)}' in config file {path}; see 'charlm train --help' "
                    "for the keys (option names with - written as _)"
                )
            if not type_ok(name, item):
                raise UsageError(
                    f"key '{where}' in config file {path} must be {type_name(name)}, got {quoted(item)}"
                )
            check_value(name, item, f"key '{where}' in config file {path}")
            flat[name] = item
    return flat


RUN_FILE_HEADER = ("# The resolved configuration of a charlm run; rerun it with: "
                   "charlm train --config THIS_FILE\n")


def run_config_toml(cfg: TrainConfig) -> str:
    """A run's config.toml: what `charlm train --config` needs to train the same run again.
    `cfg` is the run's resolved config (`Trainer` fills in the corpus, preprocessing and
    sample prefix it actually used); `out` is left out, since a rerun makes its own run
    directory, and so are options that do not apply to the cell."""
    values = {name: value for name, value in cfg.to_dict().items()
              if name != "out" and applies(name, cfg.cell)}
    return to_toml(values, RUN_FILE_HEADER)


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """A flat config dict as TOML, grouped by panel (keys with value None mean 'the default'
    and are left out)."""
    import tomli_w

    tables: dict[str, dict[str, Any]] = {}
    notes = ""
    for key, value in values.items():
        if value is None:
            continue
        try:  # a file name in another encoding: TOML holds only UTF-8, the command line more
            for item in value if isinstance(value, list) else [value]:
                str(item).encode("utf-8")
        except UnicodeEncodeError:
            shown = [os.fsencode(v) for v in value] if isinstance(value, list) else os.fsencode(value)
            notes += (f"# {key}: {shown!r} is not UTF-8, which TOML cannot hold; give it on "
                      "the command line\n")
            continue
        tables.setdefault(OPTIONS[key].panel.lower(), {})[key] = value
    return header + notes + tomli_w.dumps(tables)


def options_markdown() -> str:
    """The README's table of every `charlm train` option, made from the declarations."""
    rows = ["| option | default | values | meaning |", "|---|---|---|---|"]
    for name, meta in OPTIONS.items():
        flag = f"`--{name.replace('_', '-')}`" + (f", `{meta.short}`" if meta.short else "")
        default = default_of(name)
        shown = meta.default_text or ("" if default in (None, []) else f"`{default}`")
        values = meta.rule.describe() if meta.rule else ""
        cells = [flag, shown, values, meta.help]
        cells = [c.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;") for c in cells]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
