"""The FastAPI application: ``create_app(settings)`` wires storage, workers and routers.

Resources live for the app's lifespan: the :class:`~service.storage.Storage`
(``app.state.storage``), the inference worker thread (``app.state.worker``) and the
bound-job runner from :func:`service.jobs.create_runner` (``app.state.runner``).
Middleware (outermost first): access log + metrics, streaming body-size cap.
Every error is ``application/problem+json``, under /v2 the protocol's ``{"error": ...}``
(:mod:`service.errors`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.bodies.limits import BodyLimitMiddleware
from service.dashboard import install as install_dashboard
from service.deps import ApiKey
from service.diskspace import StorageFull
from service.errors import install_error_handlers
from service.jobs import JobRunner, create_runner
from service.middleware import AccessLogMiddleware
from service.parsing import ModelChecker
from service.routes import bounds, certifications, certify, health, jobs, models, oip, status
from service.schemas import oip_error_responses, problem_responses
from service.settings import Settings
from service.storage import Storage
from service.worker import InferenceWorker

log = logging.getLogger("lipcert.service")

DESCRIPTION = """
Certified l2 Lipschitz bounds (LipSDP, sandwich closed form) and certified robustness radii.

1. `POST /v1/models` a model file (ONNX, safetensors, LipSDP .mat); the id comes from its sha256.
2. `POST /v1/models/{id}/bounds` starts a bound job (`GET /v1/jobs/{job_id}` for its state).
3. `POST /v1/models/{id}/certify` returns predictions, margins and radii
   `margin / (sqrt(2) L)` using the smallest verified bound; with `"mode": "local"` each
   input's own certified radius (larger batches: `POST /v1/models/{id}/certifications`).

Errors are RFC 9457 `application/problem+json`; under `/v2` (Open Inference Protocol) they
are the protocol's `{"error": "<message>"}`. When `LIPCERT_API_KEY` is set, every route
except health checks and docs needs the `X-API-Key` header.
"""


def _reimport_stale_models(storage: Storage, checker: ModelChecker) -> None:
    """Re-import models of an older importer under the upload checker's limits; a full disk
    leaves them for the next start (their bounds stay unused meanwhile), never stops it."""
    try:
        outcome = storage.reimport_stale_models(checker.parse)
    except StorageFull as exc:
        log.warning("stale models not re-imported: %s", exc.detail)
        return
    refused = {k: v for k, v in outcome.items() if v != "ok"}
    if outcome:
        log.info("re-imported %d model(s); %d no longer import", len(outcome), len(refused))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``settings`` defaults to the environment (``LIPCERT_*``)."""
    settings = settings or Settings()
    logging.getLogger("lipcert").setLevel(settings.log_level.upper())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        storage = Storage(
            settings.data_dir,
            network_cache_size=settings.model_cache_size,
            min_free_bytes=settings.min_free_bytes,
            reserve_bytes=settings.reserve_bytes,
        )
        app.state.storage = storage
        checker = ModelChecker(settings.parse_timeout_s)
        checker.start()
        app.state.model_checker = checker
        await asyncio.to_thread(_reimport_stale_models, storage, checker)
        worker = InferenceWorker(storage, settings)
        worker.start()
        app.state.worker = worker
        runner: JobRunner = create_runner(settings, storage)
        app.state.runner = runner
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            worker.stop()

    app = FastAPI(
        title="lipcert",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc with local assets: service.dashboard
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
        budget_bytes=int(settings.body_budget_mb * 1024 * 1024),
        api_key=settings.api_key,
        wait_s=settings.body_wait_s,
        queue_size=settings.body_queue,
    )
    app.add_middleware(AccessLogMiddleware)

    app.include_router(health.router)
    protected: dict[str, Any] = {"dependencies": [ApiKey], "responses": problem_responses(401)}
    app.include_router(health.metrics_router, **protected)
    app.include_router(models.router, **protected)
    app.include_router(bounds.router, **protected)
    app.include_router(jobs.router, **protected)
    app.include_router(certifications.router, **protected)
    app.include_router(certify.router, **protected)
    app.include_router(oip.router, dependencies=[ApiKey], responses=oip_error_responses(401))
    app.include_router(status.router, **protected)
    install_dashboard(app)
    app.openapi = functools.partial(_openapi, app, app.openapi)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's document without the 422 ``HTTPValidationError`` it adds to every route that
    has parameters: this app answers validation errors as problem+json on /v1 (422) and as
    ``{"error": ...}`` on /v2 (400), declared by the routes where a request can fail them."""
    if app.openapi_schema is None:
        schema = build()
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                    del responses["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return app.openapi_schema or {}
