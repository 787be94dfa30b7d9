"""The `charlm` command line: the app, its sub-commands, and the error boundary.

Each command is one typed function in its own module (train, generate, eval, data, plot); this
module declares the app and its sub-Typers once, registers the commands, and turns whatever a
command raises into one line on stderr and an exit code (`main`, `handle_errors`).
"""

from __future__ import annotations

import codecs
import errno
import functools
import importlib
import io
import os
import re
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, TypeVar

import typer

from charlm.about import __version__
from charlm.system import openmp
from charlm.errors import CharlmError
from charlm.text_safety import one_line

F = TypeVar("F", bound=Callable)

app = typer.Typer(
    name="charlm",
    help=(
        "Train character-level RNN, GRU and LSTM language models.\n\n"
        "Example: charlm train --cell gru"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train character-level RNN, GRU and LSTM language models.

    Example: charlm train --cell gru
    """


def debug_enabled() -> bool:
    """Tracebacks are kept behind CHARLM_DEBUG=1 (or --debug on the main command)."""
    return os.environ.get("CHARLM_DEBUG", "") not in ("", "0")


def error_line(message: str) -> None:
    """Print one error line on stderr (never a traceback)."""
    message = one_line(message)  # one line, whatever the message held, control characters escaped
    try:
        sys.stderr.write(f"charlm: error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr is gone (a closed terminal): the exit code says it
        pass


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


data_app = typer.Typer(
    help="List, download, add and inspect corpora.\n\nExample: charlm data list",
    no_args_is_help=True,
    rich_markup_mode=None,
)
eval_app = typer.Typer(
    help="Evaluate a trained model.\n\nExample: charlm eval perplexity --split val",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _register_commands() -> None:
    from charlm.cli import data, eval, export, generate, plot, train
    from charlm.cli.command import Command

    app.command("train", no_args_is_help=False, cls=train.TrainCommand)(handle_errors(train.train))
    app.command("generate", cls=Command)(handle_errors(generate.generate))
    app.add_typer(eval_app, name="eval")
    eval_app.command("perplexity", cls=Command)(handle_errors(eval.eval_perplexity))
    app.add_typer(data_app, name="data")
    for name, command in (("list", data.data_list), ("download", data.data_download),
                          ("add", data.data_add), ("info", data.data_info)):
        data_app.command(name, cls=Command)(handle_errors(command))
    app.command("plot", cls=Command)(handle_errors(plot.plot_command))
    app.command("export", cls=Command)(handle_errors(export.export))


_register_commands()


def _click_exception_classes(name: str, module: str = "exceptions") -> tuple[type, ...]:
    """The class `name` from click and from the copy Typer >= 0.20 vendors, whichever exist."""
    found = []
    for package in ("typer._click", "click"):
        try:
            found.append(getattr(importlib.import_module(f"{package}.{module}"), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors and user errors become one line on stderr.

    SIGTERM and SIGHUP (the terminal closed) are read as Ctrl-C for the whole command: the
    trainer saves and exits 130 on any of them, and anywhere else they stop with one line and
    exit 130.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    _names_as_bytes()
    _bounded_openmp_waits()
    previous = _sigterm_as_interrupt()
    code = 0
    try:
        with library_warnings_hidden():
            _main(args)
    except SystemExit as exc:
        code = exc.code
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _end_rank(code)


def _bytes_or_escape(exc: UnicodeError):
    """A file name's undecodable bytes (U+DC80..U+DCFF, as Python reads names and arguments)
    are written back as those bytes; anything else that cannot be encoded, as an escape."""
    try:
        return codecs.lookup_error("surrogateescape")(exc)
    except UnicodeError:
        return codecs.backslashreplace_errors(exc)


def _names_as_bytes() -> None:
    """stdout and stderr print any file name, whatever its encoding (a name that is not UTF-8
    would otherwise raise UnicodeEncodeError the moment a path is printed)."""
    codecs.register_error("charlm-names", _bytes_or_escape)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="charlm-names")


OPENMP_SPINS = openmp.BUSY_SPINS


def _bounded_openmp_waits() -> None:
    """A thread of torch's OpenMP team that waits for another spins 300,000 times (~ms) before
    sleeping. When another process holds the other core, every op of a step waits like that
    for a descheduled thread: 10-40x slower; on an idle machine the long spin is the faster
    (charlm.system.openmp). So the spin is bounded where another task wants a CPU at start-up. Set
    before torch loads libgomp; OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment take
    precedence."""
    spins = openmp.spin_count()
    if spins is not None:
        os.environ["GOMP_SPINCOUNT"] = spins


def _end_rank(code) -> None:
    """A rank of a process group ends here, its output flushed: gloo's threads may still hold
    tensors, and letting the interpreter and C++ tear them down can abort the process at exit
    ("terminate called without an active exception") after a run that went well."""
    distributed = sys.modules.get("charlm.training.distributed")
    if distributed is None or not distributed.joined():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


@contextmanager
def library_warnings_hidden():
    """Warnings from the libraries underneath (torch's "Failed to initialize NumPy", deprecations)
    speak to developers, not to a user: they stay off stderr, unless CHARLM_DEBUG=1 or Python's
    own -W / PYTHONWARNINGS asks for them. charlm's own warnings are lines (errors.warn)."""
    if debug_enabled() or sys.warnoptions:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _closed_pipe() -> None:
    """The reader of stdout went away (`charlm data info x | head -2`): a normal end. Whatever
    is still buffered goes nowhere, so the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    sys.exit(0)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> dict:
    """SIGTERM and SIGHUP (unless ignored, as under nohup) raise KeyboardInterrupt; returns the
    handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)
            if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)}  # nohup


def _out_of_memory(exc: BaseException) -> str | None:
    """'out of memory (...)' when `exc` is an allocation failure on the host or a device."""
    torch = sys.modules.get("torch")
    oom_types = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
    text = str(exc)
    if not isinstance(exc, oom_types) and not (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        return None
    asked = re.search(r"[Tt]ried to allocate (\d+) bytes", text)
    if asked:
        return f"out of memory (tried to allocate {int(asked[1]) / 2**30:,.1f} GiB)"
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text)
    return f"out of memory (tried to allocate {asked[1]})" if asked else "out of memory"


def _main(args: list[str]) -> None:
    try:
        command = typer.main.get_command(app)
        rv = command.main(args=args, prog_name="charlm", standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
    except SystemExit:
        # click's own answer to a closed stdout (EPIPE while it printed, e.g. --help) is a
        # silent exit 1, with sys.stdout swapped for this wrapper
        if isinstance(sys.stdout, _click_exception_classes("PacifyFlushWrapper", "utils")):
            _closed_pipe()
        raise
    except _click_exception_classes("NoArgsIsHelpError") as exc:
        # bare `charlm`, `charlm data`: the help, as `--help` prints it (click >= 8.2 raises it
        # as a usage error; older click prints it and exits 0 by itself)
        sys.stdout.write(exc.ctx.get_help() + "\n")
        sys.exit(0)
    except _click_exception_classes("UsageError") as exc:
        hint = ""
        if exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        error_line(f"{exc.format_message()}{hint}")
        sys.exit(2)
    except _click_exception_classes("Abort"):
        error_line("interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        error_line("interrupted")
        sys.exit(130)
    except _click_exception_classes("Exit") as exc:
        sys.exit(exc.exit_code)
    except _click_exception_classes("ClickException") as exc:
        error_line(exc.format_message())
        sys.exit(exc.exit_code)
    except CharlmError as exc:  # raised outside a command (e.g. while parsing a config)
        if debug_enabled():
            raise
        error_line(str(exc))
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            _closed_pipe()
        if debug_enabled():
            raise
        where = f": {exc.filename}" if exc.filename else ""
        error_line(f"{exc.strerror or exc}{where} (set CHARLM_DEBUG=1 for details)")
        sys.exit(1)
    except Exception as exc:  # a bug: one line, the traceback behind CHARLM_DEBUG=1
        if debug_enabled():
            raise
        oom = _out_of_memory(exc)
        if oom:  # not a bug: the machine has less memory than the model or batch needs
            error_line(f"{oom}; use a smaller model or batch (e.g. --hidden, --batch-size)")
            sys.exit(1)
        error_line(
            f"unexpected {type(exc).__name__}: {exc} "
            "(this is a bug in charlm; rerun with CHARLM_DEBUG=1 for the traceback and report it)"
        )
        sys.exit(1)
    if isinstance(rv, int) and rv:
        sys.exit(rv)
