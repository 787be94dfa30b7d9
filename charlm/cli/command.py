"""`Command`: the class every charlm command is made with, so that --help names values as a
user reads them rather than as Python types.

    Typer's own                                   charlm's
    Usage: charlm data add [OPTIONS] {name} {file}   Usage: charlm data add [OPTIONS] NAME FILE
    RUN_DIR <list[Path]>   Run directories ...       RUN_DIR...   Run directories ...
    --text <list[str]>     Train on local ...        --text <file>  (a metavar given) / <str>

An argument shows its name only (the name says what it is); a repeatable option shows the type of
one value. Options with fixed values give them as their metavar (`[a|b]`: `options.choices`, or
TrainConfig's Rule in cli/train).
"""

from __future__ import annotations

import re

from typer import Context
from typer.core import TyperArgument, TyperCommand, TyperOption


class Argument(TyperArgument):
    def _shown(self) -> str:
        return (self.metavar or self.name.upper()).strip("[]")

    def _usage_display_name(self) -> str:
        name = self._shown() if self.required else f"[{self._shown()}]"
        return name + ("..." if self.nargs != 1 else "")

    def _rich_display_name(self) -> str:
        return self._shown() + ("..." if self.nargs != 1 else "")

    def display_type(self, ctx: Context) -> str:
        return ""


class Option(TyperOption):
    def display_type(self, ctx: Context) -> str:
        return re.sub(r"<list\[(\w+)\]>", lambda m: f"<{m[1].lower()}>", super().display_type(ctx))


class Command(TyperCommand):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:  # Typer builds its own parameter classes; these only add help
            if type(param) is TyperArgument:
                param.__class__ = Argument
            elif type(param) is TyperOption:
                param.__class__ = Option
