"""``lipcert serve``: run the HTTP API with uvicorn (configuration from ``LIPCERT_*``)."""

from __future__ import annotations

import typer

from service.cli._common import fail


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="TCP port.", min=0, max=65535),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the HTTP API (dashboard at http://HOST:PORT/, docs at /docs)."""
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        fail(f"invalid LIPCERT_* configuration: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    where = f"dashboard at {base}/, API docs at {base}/docs"
    typer.echo(f"lipcert: {where} (data in {settings.data_dir})")
    import logging

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from service.malloc_tuning import keep_freed_memory

    keep_freed_memory()  # no page faults on every big body (see service.malloc_tuning)
    # lipcert's own access log (service.middleware) replaces uvicorn's
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
