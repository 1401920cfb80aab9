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
        app(standalone_mode=False)
    except CurateError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except __import__("click").ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


# --- commands -----------------------------------------------------------------
# Each command parses its options, calls its stage module, prints the summary.
