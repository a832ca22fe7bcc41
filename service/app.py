"""The FastAPI application: ``create_app(settings)`` wires storage, the job runner and routers.

Resources live for the app's lifespan: the :class:`~service.storage.Storage`, the bound-job
runner from :func:`service.jobs.create_runner` (``app.state.runner``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("lipcert.service")


def _optional_router(module: str) -> Any:
    """``module.router`` when that module imports (other areas may land later)."""
    try:
        return importlib.import_module(module).router
    except ImportError as exc:
        log.warning("router %s not available: %s", module, exc)
        return None


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


def _create_runner(settings: Settings, storage: Storage) -> Any:
    try:
        jobs = importlib.import_module("service.jobs")
    except ImportError as exc:
        log.warning("job runner not available: %s", exc)
        return None
    create = getattr(jobs, "create_runner", None)
    return None if create is None else create(settings, storage)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to the environment (``LIPCERT_*``)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = Storage(settings.data_dir, network_cache_size=settings.model_cache_size)
        app.state.storage = storage
        runner = _create_runner(settings, storage)
        app.state.runner = runner
        if runner is not None and hasattr(runner, "start"):
            await _maybe_await(runner.start())
        try:
            yield
        finally:
            if runner is not None and hasattr(runner, "stop"):
                await _maybe_await(runner.stop())

    app = FastAPI(title="lipcert", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    for module in ("service.routes.bounds", "service.routes.jobs"):
        router = _optional_router(module)
        if router is not None:
            app.include_router(router)
    return app
