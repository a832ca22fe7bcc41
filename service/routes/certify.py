"""POST /v1/models/{id}/certify: predictions, margins and certified l2 radii."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response

from service.bodies.budget import BUDGET_MIN_BYTES
from service.bodies.certify import CertifyBody, CertifyOptions, decoder_for
from service.bodies.limits import content_length
from service.bodies.media import (
    JSON_MEDIA_TYPE,
    NPZ_MEDIA_TYPE,
    body_media_type,
    is_json_media,
    npz_bytes,
    prefers_npz,
)
from service.certification import certify_columns, rows_payload
from service.deps import SettingsDep, StorageDep, WorkerDep, model_or_404
from service.documents import StoredBound
from service.errors import NotFound, NoVerifiedBound
from service.local_certify import global_epsilon
from service.routes.certify_local import LocalQuery, certify_local_response, read_local_body
from service.schemas import BODY_ERRORS, CertifyRequest, CertifyResponse, problem_responses
from service.settings import Settings
from service.storage import Storage
from service.worker import InferenceWorker

router = APIRouter(prefix="/v1/models", tags=["certify"])

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
            NPZ_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "An .npz archive (numpy.savez or savez_compressed) holding "
                "inputs.npy (required: as an application/x-npy body) and labels.npy "
                "(optional: 1-D integer class indices, one per input, for certified_accuracy); "
                "no other members. Options as query parameters.",
            },
        },
    }
}


def pick_bound(storage: Storage, model_id: str, which: str) -> StoredBound:
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
    if not bound.verified:
        raise NoVerifiedBound(f"the bound from job {which!r} is not verified")
    return bound


def local_floor_bound(storage: Storage, model_id: str, which: str) -> StoredBound | None:
    """The verified bound whose global radius floors local radii: ``best`` (None when the
    model has none yet: local certification does not need one) or bound job ``which``."""
    if which == "best":
        return storage.best_bound(model_id)
    return pick_bound(storage, model_id, which)


#: Rows above which the radii and the response are computed off the event loop.
INLINE_ROWS = 256

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **problem_responses(400, 404, 409, 415, 422, *BODY_ERRORS),
    200: {
        "description": "Per-input results: per-row JSON by default, or with "
        "`Accept: application/x-npz` the same fields as columns in a NumPy .npz archive "
        "(per-input fields as arrays of length B, summary fields as 0-d arrays).",
        "content": {
            NPZ_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
            }
        },
    },
}


@router.post(
    "/{model_id}/certify",
    response_model=CertifyResponse,
    responses=_RESPONSES,
    openapi_extra=_REQUEST_BODY,
    summary="Classify inputs and certify their l2 robustness radius",
)
async def certify(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    storage: StorageDep,
    worker: WorkerDep,
    bound: str = Query(
        "best", max_length=128, description="For .npy and .npz bodies: best or a job id."
    ),
    return_logits: bool = Query(False, description="For .npy and .npz bodies."),
    epsilon: float | None = Query(None, ge=0, description="For .npy and .npz bodies."),
    mode: Literal["global", "local"] = Query("global", description="For .npy and .npz bodies."),
    method: str | None = Query(
        None, max_length=32, description="For .npy and .npz bodies, local mode."
    ),
    time_budget_s: float | None = Query(
        None, gt=0, description="For .npy and .npz bodies, local mode."
    ),
) -> Response:
    """radius = (margin - sqrt(2) E) / (sqrt(2) L) with L the chosen verified bound (design.md §4)
    and E a rigorous bound on the rounding error of the logits (tiny in float64);
    radius_pairwise = min_j (f_y - f_j - sqrt(2) E) / L_yj when the bound has pairwise constants.
    Without a verified bound: 409 with a hint. JSON bodies follow ``CertifyRequest``;
    ``application/x-npy`` bodies carry the inputs, ``application/x-npz`` bodies the inputs and
    optionally labels (``inputs.npy``, ``labels.npy``); both take the options as query
    parameters.
    ``Accept: application/x-npz`` returns the results as columns in an .npz archive.

    ``mode: local`` certifies each input on its own l2 ball instead
    (:mod:`service.routes.certify_local`): at most ``LIPCERT_MAX_LOCAL_INPUTS`` inputs here,
    larger batches as a job (``POST /v1/models/{id}/certifications``)."""
    local = LocalQuery(mode == "local", epsilon, method, time_budget_s)
    declared = content_length(request.scope)
    if declared is not None and 0 <= declared < BUDGET_MIN_BYTES:
        # read a small body before taking a slot: a client that declares a body and sends it
        # slowly (or never) must not hold one of the few slots while it trickles (review)
        await request.body()
    async with worker.slot():
        with worker.request():
            return await _certify(
                model_id, request, settings, storage, worker, bound, return_logits, local
            )


async def _certify(
    model_id: str,
    request: Request,
    settings: Settings,
    storage: Storage,
    worker: InferenceWorker,
    bound: str,
    return_logits: bool,
    local: LocalQuery,
) -> Response:
    """The certify request itself (``certify`` counts it as in progress on the worker)."""
    rec = model_or_404(storage, model_id)
    media = body_media_type(request.scope)
    decode = decoder_for(media)
    as_npz = prefers_npz(request.headers.get("accept"))
    chosen: list[StoredBound] = []  # set by the decoder, before the logits
    if local.enabled and not is_json_media(media):  # .npy / .npz with ?mode=local
        x, labels = await read_local_body(request, media, rec, settings)
        floor = local_floor_bound(storage, model_id, bound)
        return await certify_local_response(storage, settings, rec, x, labels, local, floor, as_npz)
    epsilon = 0.0
    if not is_json_media(media):
        epsilon = global_epsilon(local.epsilon, local.method, local.time_budget_s)

    def choose_bound(which: str) -> None:
        chosen.append(pick_bound(storage, model_id, which))

    body = CertifyBody(
        request,
        rec.input_shape,
        settings.max_inputs,
        settings.max_upload_bytes,
        CertifyOptions(bound, return_logits, epsilon),
        functools.partial(worker.infer_bounded, model_id),
        choose_bound,
    )
    got = await decode(body)
    if got.local is not None:  # a JSON body with "mode": "local"
        query = LocalQuery(True, got.local.epsilon, got.local.method, got.local.time_budget_s)
        floor = local_floor_bound(storage, model_id, got.local.bound)
        return await certify_local_response(
            storage, settings, rec, got.local.x, got.local.labels, query, floor, as_npz
        )
    logits, logit_error, options = got.logits, got.logit_error, got.options
    extra = {"model_id": model_id, "precision": worker.dtype_name}

    def render() -> bytes:
        cert = certify_columns(
            logits,
            chosen[-1],
            labels=options.labels,
            return_logits=options.return_logits,
            epsilon=options.epsilon,
            logit_error=logit_error,
        )
        if as_npz:
            return npz_bytes(cert.columns, {**cert.summary, **extra})
        return orjson.dumps({**rows_payload(cert), **extra})

    # small batches inline (no thread hop: single-input latency), big ones off the event loop
    content = render() if len(logits) <= INLINE_ROWS else await asyncio.to_thread(render)
    media = NPZ_MEDIA_TYPE if as_npz else JSON_MEDIA_TYPE
    return Response(content, media_type=media, headers={"Vary": "Accept"})
