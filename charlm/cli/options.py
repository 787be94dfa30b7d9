"""Options that several commands take alike (generate, eval perplexity, export)."""

import sys

import typer

from charlm.checks import Rule
from charlm.config.train import OPTIONS
from charlm.model.config import IMPLS, WEIGHTS

CheckpointOpt = typer.Option(
    None, "--checkpoint",
    help="A checkpoint file, a run directory (its best.pt) or a folder written by charlm export. "
         "Default: the latest run's best.pt (runs root: $CHARLM_RUNS_DIR or ./runs).",
    show_default=False,
)
DeviceOpt = typer.Option("auto", "--device", help=OPTIONS["device"].help,  # train's own words
                         metavar="[auto|cpu|cuda|cuda:N|mps]")


def choices(flag: str, allowed: tuple[str, ...]) -> dict:
    """The Typer settings of an option that takes one of `allowed`: the choices as its metavar
    in --help, and the value checked (case ignored) as it is parsed, with the Rule's wording
    (before any checkpoint is read or torch is imported)."""
    rule = Rule(choices=allowed)

    def check(value):
        if value is None or rule.ok(value.lower()):
            return value and value.lower()
        rule.check(flag, value)

    return {"callback": check, "metavar": f"[{'|'.join(allowed)}]"}


ImplOpt = typer.Option(
    None, "--impl",
    help="Load with another implementation: auto, fused, scratch or fast (GRU on CPU). "
         "Default: the checkpoint's own. Parameters are laid out alike in all of them.",
    show_default=False, **choices("--impl", ("auto", *IMPLS)),
)
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout instead of text.")
QuietOpt = typer.Option(False, "--quiet", "-q",
                        help="Say nothing on stderr but errors and warnings (not even which model "
                             "is used).")


def say(line: str) -> None:
    """A line for the person at the terminal, on stderr (stdout stays the command's output)."""
    sys.stderr.write(f"charlm: {line}\n")
    sys.stderr.flush()


WeightsOpt = typer.Option(
    "auto", "--weights", **choices("--weights", WEIGHTS),
    help="auto: a run trained with --ema uses its averaged weights, else the raw ones; ema; raw.",
)
