"""What every subcommand shares: the one-line error exit."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


def fail(reason: str, code: int = 2) -> NoReturn:
    """Print ``lipcert: error: <reason>`` (one line) on stderr and exit non-zero."""
    sys.stderr.write(f"lipcert: error: {' '.join(reason.split())}\n")
    raise typer.Exit(code)
