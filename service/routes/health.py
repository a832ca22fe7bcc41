"""Liveness/readiness (OIP v2 paths, always open) and Prometheus ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service import metrics
from service.errors import ServiceError
from service.schemas import Live, Ready, oip_error_responses

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get("/v2/health/live", response_model=Live, summary="The process is up")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    response_model=Ready,
    responses={
        503: {
            **oip_error_responses(503)[503],
            "description": "Not ready: the protocol's {error} (the reasons joined) with "
            "ready: false and reasons, a list of {code, detail}: storage-full, "
            "storage-unavailable, worker-down, queue-unavailable, no-runner.",
        }
    },
    summary="Storage, the inference worker and the job queue are up",
)
async def ready(request: Request) -> dict[str, Any]:
    reasons = not_ready_reasons(request.app.state)  # statvfs and flags: no thread hop
    if reasons:
        detail = "; ".join(r["detail"] for r in reasons)
        raise ServiceError(detail, status=503, code="not-ready", ready=False, reasons=reasons)
    return {"ready": True}


def not_ready_reasons(state: Any) -> list[dict[str, str]]:
    """Why the server cannot take work now (empty: ready). Liveness never depends on it."""
    reasons = []
    storage = getattr(state, "storage", None)
    worker = getattr(state, "worker", None)
    runner = getattr(state, "runner", None)
    if storage is None:
        reasons.append({"code": "storage-unavailable", "detail": "storage is not open"})
    else:
        problem = storage.space_problem()
        if problem is not None:
            reasons.append({"code": "storage-full", "detail": problem})
    if worker is None or not worker.alive:
        reasons.append({"code": "worker-down", "detail": "the inference worker is not running"})
    if runner is None:
        reasons.append({"code": "no-runner", "detail": "the job runner is not available"})
    else:
        queue_problem = getattr(runner, "unavailable_reason", None)
        why = queue_problem() if callable(queue_problem) else None
        if why:
            reasons.append({"code": "queue-unavailable", "detail": why})
    return reasons


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
