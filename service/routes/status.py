"""``GET /v1/status``: what the dashboard's status panel shows, as one JSON document.

Version, readiness (with the reasons of ``/v2/health/ready``), the inference worker's device and
dtype, the solver device setting, the job runner
(local process pool or RQ) with its jobs per status and the queued/running jobs themselves, the
inference queue depth, whether an API key is required, the SDP solvers a bound request may
name, and the certify modes the server offers
(read from the certify operation's OpenAPI description, so it follows the routes as they are).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from sdp.solvers import solver_names
from service.deps import RunnerDep, SettingsDep, WorkerDep
from service.routes.health import not_ready_reasons
from service.schemas import PROBLEM_RESPONSES

log = logging.getLogger("lipcert.service")

router = APIRouter(prefix="/v1", tags=["status"])

CERTIFY_PATH = "/v1/models/{model_id}/certify"
#: Most queued/running jobs listed (the counts are always complete).
ACTIVE_LISTED = 50


class StatusJob(BaseModel):
    job_id: str
    model_id: str
    method: str
    status: str
    progress: dict[str, Any]
    created_at: str
    started_at: str | None


class Status(BaseModel):
    """The server at a glance (``GET /v1/status``)."""

    version: str = Field(examples=["0.1.0"])
    ready: bool = Field(description="As GET /v2/health/ready: able to take work now.")
    not_ready: list[dict[str, str]] = Field(
        description="Why not ({code, detail}: storage-full, queue-unavailable, ...); empty "
        "when ready."
    )
    device: str = Field(description="Device of the inference worker: cpu or cuda.")
    dtype: str = Field(description="Dtype of the inference worker's forward passes.")
    solver_device: str = Field(description="LIPCERT_DEVICE for the LipSDP solver: auto|cpu|cuda.")
    runner: str | None = Field(description="local (process pool), rq (Redis queue) or null.")
    jobs: dict[str, int] = Field(description="Bound jobs per status.")
    active_jobs: list[StatusJob] = Field(description="Queued and running jobs, oldest first.")
    inference_queue: int = Field(description="Inference requests waiting for the worker.")
    api_key_required: bool
    solvers: list[str] = Field(description="SDP solver names a bound request may pick.")
    certify_modes: list[str] = Field(
        description="Values of the certify operation's `mode` option (['global'] when the "
        "server has no such option)."
    )


def certify_modes(request: Request) -> list[str]:
    """The ``mode`` values the certify operation documents (query parameter or JSON field)."""
    try:
        op = request.app.openapi()["paths"][CERTIFY_PATH]["post"]
    except (KeyError, TypeError):
        return ["global"]
    for param in op.get("parameters", []):
        if param.get("name") == "mode":
            return _enum(param.get("schema", {})) or ["global"]
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    mode = body.get("schema", {}).get("properties", {}).get("mode")
    return (_enum(mode) if isinstance(mode, dict) else []) or ["global"]


def _enum(schema: dict[str, Any]) -> list[str]:
    values = schema.get("enum")
    if values is None:
        for alt in schema.get("anyOf", []):
            values = alt.get("enum")
            if values:
                break
    return [str(v) for v in values or []]


def _jobs(runner: Any) -> tuple[dict[str, int], list[dict[str, Any]]]:
    if runner is None:
        return {}, []
    try:
        counts = {str(k): int(v) for k, v in dict(runner.status_counts()).items()}
        lister = getattr(runner, "active_jobs", None)
        active = [] if lister is None else list(lister(ACTIVE_LISTED))
    except Exception as exc:  # a status page must answer even when Redis is away
        log.warning("job runner status not available: %s", exc)
        return {}, []
    return counts, [
        {
            "job_id": r.id,
            "model_id": r.spec.model_id,
            "method": r.spec.method,
            "status": r.status,
            "progress": r.progress,
            "created_at": r.created_at,
            "started_at": r.started_at,
        }
        for r in active
    ]


@router.get("/status", response_model=Status, responses=PROBLEM_RESPONSES, summary="Server status")
def status(request: Request, settings: SettingsDep, worker: WorkerDep, runner: RunnerDep) -> Any:
    """Version, readiness, devices, job runner with jobs per status and the active jobs,
    inference queue depth, whether X-API-Key is required, the solvers and the certify modes."""
    counts, active = _jobs(runner)
    reasons = not_ready_reasons(request.app.state)
    return {
        "version": request.app.version,
        "ready": not reasons,
        "not_ready": reasons,
        "device": str(getattr(worker, "device", "cpu")),
        "dtype": str(getattr(worker, "dtype_name", settings.cpu_dtype)),
        "solver_device": settings.device,
        "runner": getattr(runner, "name", None),
        "jobs": counts,
        "active_jobs": active,
        "inference_queue": worker.queue_depth(),
        "api_key_required": bool(settings.api_key),
        "solvers": solver_names(),
        "certify_modes": certify_modes(request),
    }
