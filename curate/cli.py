"""The `curate` command line: a thin Typer shell over one module per stage.

Heavy imports happen inside each command so `curate --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import CurateError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build fine-tuning datasets for anime image models, and train on them.",
)


def main() -> None:
    """Console entry point: user errors print one line and exit non-zero."""
    try:
        app()
    except CurateError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


# --- commands -----------------------------------------------------------------
# Each command parses its options, calls its stage module, prints the summary.


@app.command()
def version() -> None:
    """Print curate's version."""
    from . import __version__

    typer.echo(__version__)
