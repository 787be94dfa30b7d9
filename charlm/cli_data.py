"""`charlm data ...`: list, download, add and inspect corpora."""

from __future__ import annotations

import typer

data_app = typer.Typer(
    help="List, download, add and inspect corpora.\n\nExample: charlm data list",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@data_app.command("list")
def data_list() -> None:
    """List the named corpora, their sizes and whether they are cached.

    Example: charlm data list
    """
    typer.echo("timemachine")
