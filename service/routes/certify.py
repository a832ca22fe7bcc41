"""POST /v1/models/{id}/certify: predictions, margins and certified l2 radii."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.certification import as_array, batch_inputs, load_npy, loads_json, results_payload
from service.deps import SettingsDep, StorageDep, WorkerDep, model_or_404
from service.errors import InvalidInput, NotFound, NoVerifiedBound, UnsupportedMediaType
from service.schemas import PROBLEM_RESPONSES, CertifyRequest, CertifyResponse
from service.storage import Storage

router = APIRouter(prefix="/v1/models", tags=["certify"])

NPY_TYPES = ("application/x-npy", "application/octet-stream")

_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": CertifyRequest.model_json_schema(),
                "example": {"inputs": [[0.1, 0.2], [0.5, -0.3]], "labels": [0, 1]},
            },
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "A .npy array (batch, n0) or (batch, *input_shape); options "
                "as query parameters.",
            },
        },
    }
}


def pick_bound(storage: Storage, model_id: str, which: str) -> dict[str, Any]:
    """The verified bound to use: ``best`` or the result of bound job ``which``."""
    if which == "best":
        bound = storage.best_bound(model_id)
        if bound is None:
            raise NoVerifiedBound(
                "this model has no verified Lipschitz bound yet",
                hint=f"POST /v1/models/{model_id}/bounds with a method (e.g. lipsdp-neuron), "
                "wait for the job, then certify",
            )
        return bound
    bound = storage.bound_for_job(model_id, which)
    if bound is None:
        raise NotFound(f"no bound of this model from job {which!r}", code="bound-not-found")
    if bound.get("verified") is not True:
        raise NoVerifiedBound(f"the bound from job {which!r} is not verified")
    return bound


@router.post(
    "/{model_id}/certify",
    response_model=CertifyResponse,
    responses=PROBLEM_RESPONSES,
    openapi_extra=_REQUEST_BODY,
    summary="Classify inputs and certify their l2 robustness radius",
)
async def certify(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    storage: StorageDep,
    worker: WorkerDep,
    bound: str = Query("best", max_length=128, description="For .npy bodies: best or a job id."),
    return_logits: bool = Query(False, description="For .npy bodies."),
    epsilon: float = Query(0.0, ge=0, description="For .npy bodies."),
) -> JSONResponse:
    """radius = (margin - sqrt(2) E) / (sqrt(2) L) with L the chosen verified bound (DESIGN §4)
    and E a rigorous bound on the rounding error of the logits (tiny in float64);
    radius_pairwise = min_j (f_y - f_j - sqrt(2) E) / L_yj when the bound has pairwise constants.
    Without a verified bound: 409 with a hint. JSON bodies follow ``CertifyRequest``;
    ``application/x-npy`` bodies carry the inputs and take the options as query parameters."""
    rec = model_or_404(storage, model_id)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    labels: list[int] | None = None
    if ctype in NPY_TYPES:
        arr = load_npy(body)
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        try:
            req = CertifyRequest.model_validate(loads_json(body))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise InvalidInput(f"{where}: {err['msg']}", code="validation-error") from None
        arr = as_array(req.inputs)
        labels, bound = req.labels, req.bound
        return_logits, epsilon = req.return_logits, req.epsilon
    else:
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not accepted; use application/json or application/x-npy"
        )
    x = batch_inputs(arr, rec.input_shape, settings.max_inputs)
    chosen = pick_bound(storage, model_id, bound)
    logits = await worker.infer(model_id, x)
    run = functools.partial(
        results_payload,
        logits,
        chosen,
        labels=labels,
        return_logits=return_logits,
        epsilon=epsilon,
        logit_error=worker.logit_error(model_id, x),
    )
    # small batches inline (skip the thread hop: single-input latency), big ones off the loop
    payload = run() if len(x) <= 256 else await asyncio.to_thread(run)
    payload["model_id"] = model_id
    payload["precision"] = worker.dtype_name
    return JSONResponse(payload)
