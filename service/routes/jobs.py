"""``/v1/jobs/{id}``: job state, server-sent progress events, cancellation.

``GET /v1/jobs/{id}/events`` is a ``text/event-stream``: an ``event: status`` whenever the
status changes, ``event: progress`` whenever the solver reports (``phase``, ``iteration``,
``residual``, ...), ``: keep-alive`` comments in quiet periods, and a final ``event: end``
carrying the whole job once it is succeeded, failed or cancelled; then the stream closes.
If the job queue becomes unreachable mid-stream, an ``event: error`` (``queue-unavailable``)
ends it; the client's reconnect (``retry``) is answered 503 until the queue is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.deps import RunnerDep
from service.errors import NotFound, QueueUnavailable, ServiceError
from service.jobs.base import JobRecord
from service.schemas import problem_responses

router = APIRouter(prefix="/v1", tags=["jobs"])
"""Included by :func:`service.app.create_app` behind the API-key dependency."""

#: Unknown job; 503 when no job runner is available.
_RESPONSES = problem_responses(404, 503)
POLL_S = 0.25
KEEPALIVE_S = 15.0


class JobOut(BaseModel):
    """A bound job (``GET /v1/jobs/{id}``); ``job_id`` repeats ``id`` for clients."""

    id: str
    job_id: str
    kind: Literal["bound", "certification"] = Field(
        default="bound",
        description="bound: a Lipschitz bound job; certification: a local certification job "
        "(its per-input results at GET /v1/jobs/{id}/result).",
    )
    model_id: str
    method: str
    pairwise: bool
    solver: str | None
    timeout_s: float | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: dict[str, Any] = Field(
        description="Last solver report: phase (load, reduce, build, solve, verify, ...), "
        "iteration, residual/gap, ..."
    )
    result: dict[str, Any] | None = Field(
        description="When succeeded: the stored bound (lipschitz_bound, method, verified, "
        "certificate with rho and multipliers T, timings, lower_bound, notes)."
    )
    error: dict[str, Any] | None = Field(
        description="When failed/cancelled: {code, detail}; codes include timeout, "
        "server-restarted, worker-lost, worker-died, solver-crashed and sdp error codes."
    )
    created_at: str
    started_at: str | None
    finished_at: str | None
    reused: bool = Field(description="True when an identical earlier request's job answered.")
    worker: dict[str, Any] = Field(description="Where it runs: runner, host, worker, pid.")


def _runner(runner: Any) -> Any:
    if runner is None:
        raise ServiceError("the job runner is not available", status=503, code="no-runner")
    return runner


def _job_or_404(rec: JobRecord | None, job_id: str) -> JobRecord:
    if rec is None:
        raise NotFound(f"no job with id {job_id!r}", code="job-not-found")
    return rec


@router.get("/jobs/{job_id}", summary="Job state", response_model=JobOut, responses=_RESPONSES)
def get_job(job_id: str, runner: RunnerDep) -> dict[str, Any]:
    """Status (queued|running|succeeded|failed|cancelled), progress, result or error."""
    return _job_or_404(_runner(runner).get(job_id), job_id).to_dict()


@router.delete(
    "/jobs/{job_id}", summary="Cancel a job", response_model=JobOut, responses=_RESPONSES
)
def cancel_job(job_id: str, runner: RunnerDep) -> dict[str, Any]:
    """Cancel: a queued job never runs, a running job's solver process is killed.

    A job that already ended is returned unchanged.
    """
    return _job_or_404(_runner(runner).cancel(job_id), job_id).to_dict()


def _sse(event: str, data: dict[str, Any], seq: int) -> str:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


async def job_events(runner: Any, job_id: str) -> AsyncIterator[str]:
    """The event stream of one job (see module docstring); polls the runner's job state."""
    seq = 0
    last_status: str | None = None
    last_progress: dict[str, Any] | None = None
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        try:
            rec = await run_in_threadpool(runner.get, job_id)
        except QueueUnavailable as exc:  # the client reconnects (retry) and gets a 503
            seq += 1
            yield _sse("error", {"code": exc.code, "detail": exc.detail}, seq)
            return
        if rec is None:
            seq += 1
            yield _sse("error", {"code": "job-not-found", "detail": "job disappeared"}, seq)
            return
        if rec.status != last_status:
            last_status = rec.status
            seq += 1
            yield _sse("status", {"job_id": job_id, "status": rec.status}, seq)
            last_sent = time.monotonic()
        if rec.progress and rec.progress != last_progress:
            last_progress = rec.progress
            seq += 1
            yield _sse("progress", {"job_id": job_id, **rec.progress}, seq)
            last_sent = time.monotonic()
        if rec.terminal:
            seq += 1
            yield _sse("end", rec.to_dict(), seq)
            return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)


@router.get(
    "/jobs/{job_id}/events",
    summary="Job progress as server-sent events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_RESPONSES},
)
def stream_job_events(job_id: str, runner: RunnerDep) -> StreamingResponse:
    """``text/event-stream`` of status and progress events; ends when the job ends."""
    runner = _runner(runner)
    _job_or_404(runner.get(job_id), job_id)
    return StreamingResponse(
        job_events(runner, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
