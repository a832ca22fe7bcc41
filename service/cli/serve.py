"""``lipcert serve``: run the HTTP API with uvicorn."""

from __future__ import annotations

import typer

from service.cli._common import fail


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="TCP port."),
) -> None:
    """Serve the HTTP API (docs at http://HOST:PORT/docs)."""
    fail("serve is not implemented yet")
