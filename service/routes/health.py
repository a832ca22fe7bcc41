"""Liveness/readiness (OIP v2 paths, always open) and Prometheus ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service import metrics
from service.errors import ServiceError
from service.schemas import Live, Ready

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get("/v2/health/live", response_model=Live, summary="The process is up")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    response_model=Ready,
    responses={503: {"description": "Not ready (storage or inference worker down)."}},
    summary="Storage and the inference worker are up",
)
async def ready(request: Request) -> dict[str, Any]:
    worker = getattr(request.app.state, "worker", None)
    storage = getattr(request.app.state, "storage", None)
    if storage is None or worker is None or not worker.alive:
        raise ServiceError("not ready", status=503, code="not-ready")
    return {"ready": True}


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
    summary="Prometheus metrics",
)
async def prometheus(request: Request) -> Response:
    runner = getattr(request.app.state, "runner", None)
    counts = getattr(runner, "status_counts", None)
    if callable(counts):
        try:
            for status, n in dict(counts()).items():
                metrics.JOBS.labels(str(status)).set(float(n))
        except Exception:  # metrics must never fail because of the runner
            pass
    body, ctype = metrics.render()
    return Response(content=body, media_type=ctype)
