"""What every charlm command shares: turning user errors into one line and an exit code."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

import typer

from charlm.errors import CharlmError

F = TypeVar("F", bound=Callable)


def debug_enabled() -> bool:
    """Tracebacks are kept behind CHARLM_DEBUG=1 (or --debug on the main command)."""
    return os.environ.get("CHARLM_DEBUG", "") not in ("", "0")


def error_line(message: str) -> None:
    """Print one error line on stderr (never a traceback)."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"charlm: error: {message}\n")
    sys.stderr.flush()


def handle_errors(fn: F) -> F:
    """Decorate a command: a CharlmError becomes one stderr line and its exit code; Ctrl-C (or
    SIGTERM, see cli.main) says 'interrupted' and exits 130 (Typer alone would exit silently)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CharlmError as exc:
            if debug_enabled():
                raise
            error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            error_line("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
