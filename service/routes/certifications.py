"""Certification jobs: local (per-input) certification of large batches (issue 12).

``POST /v1/models/{id}/certifications`` validates a batch (a JSON body like certify's, or an
``.npy`` / ``.npz`` body with the options as query parameters), stores it and answers
``202`` with ``Location: /v1/jobs/{job_id}``. The job certifies the batch in chunks on the
job runner (local process pool or RQ workers, :mod:`service.jobs.certify`); its progress
arrives over ``GET /v1/jobs/{id}/events`` (``phase: certify``, ``chunks_done``,
``inputs_done``, ...), its summary (``accuracy``, ``certified_accuracy``, ``seconds``, ...)
in the job's ``result``, and the per-input results at ``GET /v1/jobs/{id}/result``, as JSON
rows or, with ``Accept: application/x-npz``, as columns of an .npz archive.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from service.bodies.arrays import as_array, batch_inputs
from service.bodies.budget import hold_request_memory
from service.bodies.json_body import loads_json
from service.bodies.media import (
    JSON_MEDIA_TYPE,
    NPZ_MEDIA_TYPE,
    body_media_type,
    is_json_media,
    npz_bytes,
    prefers_npz,
)
from service.certification import Certified, result_rows
from service.deps import RunnerDep, SettingsDep, StorageDep, model_or_404, runner_or_503
from service.errors import InvalidInput, NotFound, ServiceError
from service.jobs.base import JobSpec
from service.jobs.certify import CertifyOptions, batch_dir, inputs_npz, read_npz
from service.local_certify import check_labels, local_options, verified_global_bound
from service.routes.certify import local_floor_bound
from service.routes.certify_local import read_local_body
from service.routes.jobs import JobOut
from service.schemas import BODY_ERRORS, problem_responses

router = APIRouter(prefix="/v1", tags=["certify"])
"""Included by :func:`service.app.create_app` behind the API-key dependency."""

MAX_TIMEOUT_S = 7 * 24 * 3600.0


class CertificationRequest(BaseModel):
    """Body of ``POST /v1/models/{id}/certifications`` (JSON)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": [[0.1, 0.2], [0.5, -0.3]], "labels": [0, 1], "epsilon": 0.1}]
        },
    )

    inputs: list[Any] = Field(min_length=1, description="Batch of inputs (numbers only).")
    labels: list[StrictInt] | None = Field(default=None, description="One class per input.")
    mode: Literal["local"] = Field(
        default="local", description="Always local (accepted for bodies shared with POST /certify)."
    )
    epsilon: float | list[float] | None = Field(
        default=None,
        description="Certify at this l2 eps (one number or one per input); left out, the "
        "largest certified radius of each input is searched.",
    )
    method: str | None = Field(
        default=None,
        max_length=32,
        description="ibp|crown|alpha-crown|sdp-crown|bab|beta-crown|auto.",
    )
    time_budget_s: float | None = Field(
        default=None, gt=0, description="Radius search: seconds per input (at most the server's)."
    )
    bound: str = Field(
        default="best", max_length=128, description='Radius floor: "best" or a bound job id.'
    )
    chunk_rows: int | None = Field(
        default=None, ge=1, le=65536, description="Inputs per chunk (default the server's)."
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Processes (local runner) or RQ workers at least (RQ) to certify the "
        "chunks (default LIPCERT_CERTIFY_WORKERS).",
    )
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)


def _json_request(body: bytes) -> CertificationRequest:
    try:
        return CertificationRequest.model_validate(loads_json(body))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"{where}: {err['msg']}", code="validation-error") from None


_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": CertificationRequest.model_json_schema()},
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "A .npy array of inputs; options as query parameters.",
            },
            NPZ_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "An .npz archive with inputs.npy and optionally labels.npy; "
                "options as query parameters.",
            },
        },
    }
}


@router.post(
    "/models/{model_id}/certifications",
    status_code=202,
    response_model=JobOut,
    responses=problem_responses(400, 404, 415, 422, 507, *BODY_ERRORS),
    openapi_extra=_REQUEST_BODY,
    summary="Start a local certification job for a batch of inputs",
)
async def request_certification(
    model_id: str,
    request: Request,
    response: Response,
    settings: SettingsDep,
    storage: StorageDep,
    runner: RunnerDep,
    epsilon: float | None = Query(None, description="For .npy and .npz bodies."),
    method: str | None = Query(None, max_length=32, description="For .npy and .npz bodies."),
    time_budget_s: float | None = Query(None, gt=0, description="For .npy and .npz bodies."),
    bound: str = Query("best", max_length=128, description="For .npy and .npz bodies."),
    chunk_rows: int | None = Query(None, ge=1, le=65536, description="For .npy/.npz bodies."),
    workers: int | None = Query(None, ge=1, le=64, description="For .npy and .npz bodies."),
    timeout_s: float | None = Query(None, gt=0, le=MAX_TIMEOUT_S, description="Ditto."),
) -> dict[str, Any]:
    """Validate and store the batch, queue the job: 202, ``Location: /v1/jobs/{job_id}``.

    Bad input (shape, NaN, labels, eps < 0 or not one per input, unknown method) is refused
    here with 422 problem+json before anything is queued."""
    runner = runner_or_503(runner)
    rec = model_or_404(storage, model_id)
    ctype = body_media_type(request.scope)
    labels: Any = None
    eps: Any = epsilon  # JSON bodies: one number or one per input
    if is_json_media(ctype):
        body = await request.body()
        req = await asyncio.to_thread(_json_request, body)
        x = await asyncio.to_thread(
            batch_inputs, as_array(req.inputs), rec.input_shape, settings.max_inputs
        )
        labels, eps, method, bound = req.labels, req.epsilon, req.method, req.bound
        time_budget_s = req.time_budget_s
        chunk_rows, workers, timeout_s = req.chunk_rows, req.workers, req.timeout_s
        del req
        hold_request_memory(request.scope, len(body) + x.nbytes)
    else:  # .npy / .npz (415 for anything else)
        x, labels = await read_local_body(request, ctype, rec, settings)
    options = local_options(
        method, eps, time_budget_s, batch=len(x), max_time_budget_s=settings.local_time_budget_s
    )
    if not rec.output_shape or int(rec.output_shape[0]) < 2:
        raise InvalidInput(
            "the model has a single output; certified radii need at least two classes",
            code="not-a-classifier",
        )
    y = check_labels(labels, len(x), int(rec.output_shape[0]))
    floor = local_floor_bound(storage, model_id, bound)
    per_input = isinstance(options.epsilon, np.ndarray)
    opts = CertifyOptions.new(
        rows=len(x),
        chunk_rows=chunk_rows or settings.certify_chunk_rows,
        workers=workers or settings.certify_workers,
        method=options.method,
        time_budget_s=options.time_budget_s,
        epsilon=None if per_input or options.epsilon is None else float(options.epsilon),
        per_input_epsilon=per_input,
        lipschitz=verified_global_bound(floor),
        bound_job_id=None if floor is None else floor.job_id,
    )
    eps_column = options.epsilon if per_input else None
    data = await asyncio.to_thread(inputs_npz, x, y, eps_column)  # type: ignore[arg-type]
    folder = batch_dir(storage.data_dir, opts.batch_id)
    folder.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread((folder / "inputs.npz").write_bytes, data)
    spec = JobSpec(
        model_id=model_id,
        method=options.method,
        timeout_s=timeout_s,
        kind="certification",
        certify=opts.to_dict(),
    )
    job = await asyncio.to_thread(runner.submit, spec)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return dict(job.to_dict())


def _result_columns(storage: Any, runner: Any, job_id: str) -> tuple[Any, dict[str, Any]]:
    rec = runner_or_503(runner).get(job_id)
    if rec is None:
        raise NotFound(f"no job with id {job_id!r}", code="job-not-found")
    if rec.spec.kind != "certification":
        raise NotFound(
            "a bound job has no per-input result; its bound is the job's `result`",
            code="result-not-found",
        )
    if rec.status != "succeeded":
        raise ServiceError(
            f"the job is {rec.status}; its result exists once it succeeded",
            status=409,
            code="job-not-succeeded",
            hint=f"GET /v1/jobs/{job_id}/events streams its progress",
        )
    batch_id = str((rec.spec.certify or {}).get("batch_id", ""))
    path = batch_dir(storage.data_dir, batch_id) / "result.npz"
    if not path.exists():
        raise NotFound("the result of this job is no longer stored", code="result-not-found")
    return read_npz(path.read_bytes()), dict(rec.result or {})


@router.get(
    "/jobs/{job_id}/result",
    responses={
        **problem_responses(404, 409, 422),
        200: {
            "description": "Per-input results of a succeeded certification job: JSON rows, "
            "or with `Accept: application/x-npz` the same fields as columns.",
            "content": {NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
    },
    summary="Per-input results of a certification job",
)
async def certification_result(
    job_id: str, request: Request, storage: StorageDep, runner: RunnerDep
) -> Response:
    """``{summary..., "results": [{prediction, margin, radius, radius_method, ...}]}`` or an
    .npz of columns (``Accept: application/x-npz``)."""
    columns, summary = await asyncio.to_thread(_result_columns, storage, runner, job_id)
    cert = Certified(columns, summary)
    if prefers_npz(request.headers.get("accept")):
        flat = {k: v for k, v in summary.items() if _scalar(v)}
        content = await asyncio.to_thread(npz_bytes, columns, flat)
        return Response(content, media_type=NPZ_MEDIA_TYPE, headers={"Vary": "Accept"})
    payload = {**summary, "results": result_rows(cert)}
    content = await asyncio.to_thread(orjson.dumps, payload)
    return Response(content, media_type=JSON_MEDIA_TYPE, headers={"Vary": "Accept"})


def _scalar(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, bool | int | str)
