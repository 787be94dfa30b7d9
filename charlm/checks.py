"""What values a setting takes, said once, checked with one wording everywhere.

A `Rule` is attached to a dataclass field (`field(metadata={"rule": Rule(...)})`); the same rule
then checks the value wherever it comes from (a command-line option, a config file, a
checkpoint) and the same words describe it in `--help` and in errors::

    cell     Rule(choices=("rnn", "gru", "lstm"))   "cell must be one of rnn, gru, lstm; got 'x'"
    hidden   Rule(int, low=1)                       "hidden must be an integer >= 1, got 0"
    dropout  Rule(float, low=0, high=1, high_open)  "dropout must be in [0, 1), got 1.0"

The key names where the value came from: the field's name for a checkpoint or the Python API,
`--cell` for the command line, "key 'model.cell' in config file run.toml" for a file. A choice
that is a near miss is named: "--cell must be one of rnn, gru, lstm; got 'gur' (did you mean gru?)".
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any

from charlm.errors import UsageError
from charlm.text_safety import quoted, shown


@dataclass(frozen=True)
class Rule:
    kind: type | None = None  # int or float: a number in the range below; bool; None: anything
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    text: str | None = None  # how to say the range when the bounds alone say it badly

    def describe(self) -> str:
        """'one of a, b', 'an integer >= 1', 'in [0, 1)', 'a positive number', ..."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.text:
            return self.text
        if self.kind is bool:
            return "true or false"
        prefix = "an integer " if self.kind is int else ""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{prefix}in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            if self.kind is float and self.low == 0 and self.low_open:
                return "a positive number"
            return f"{prefix}{'>' if self.low_open else '>='} {_num(self.low)}"
        return "an integer" if self.kind is int else "a number"

    def ok(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.kind is None:
            return True
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, key: str, value: Any) -> None:
        """Raise a UsageError naming `key` unless `value` obeys the rule."""
        if self.ok(value):
            return
        if self.choices:
            raise UsageError(f"{key} must be {self.describe()}; got {quoted(value)}{self.hint(value)}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        raise UsageError(f"{key} must be {self.describe()}, got "
                         f"{shown(value) if number else quoted(value)}")

    def hint(self, value: Any) -> str:
        """' (did you mean gru?)' for a near miss of a choice ('gur'), else ''."""
        near = difflib.get_close_matches(str(value).lower(), self.choices, n=1, cutoff=0.6)
        return f" (did you mean {near[0]}?)" if near else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def rule_of(cls, name: str) -> Rule | None:
    """The Rule declared on field `name` of dataclass `cls` (None when it has none)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("rule")
    raise KeyError(name)


def check_fields(obj) -> None:
    """Check every field of a dataclass instance that declares a Rule."""
    for f in fields(obj):
        rule = f.metadata.get("rule")
        if rule is not None:
            rule.check(f.name, getattr(obj, f.name))
