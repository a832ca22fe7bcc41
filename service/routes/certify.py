"""POST /v1/models/{id}/certify: predictions, margins and certified l2 radii."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError

from service.certification import (
    as_array,
    batch_inputs,
    certify_columns,
    loads_json,
    rows_payload,
)
from service.certify_media import JSON_MEDIA_TYPE, NPZ_MEDIA_TYPE, npz_bytes, prefers_npz
from service.deps import SettingsDep, StorageDep, WorkerDep, model_or_404
from service.errors import InvalidInput, NotFound, NoVerifiedBound, UnsupportedMediaType
from service.middleware import body_media_type, hold_request_memory, is_json_media
from service.npy_stream import NpyRows, infer_npy_body
from service.npz_body import read_npz_body
from service.schemas import PROBLEM_RESPONSES, CertifyRequest, CertifyResponse
from service.settings import Settings
from service.storage import Storage
from service.worker import InferenceWorker

router = APIRouter(prefix="/v1/models", tags=["certify"])
T = TypeVar("T")

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


def _check_epsilon(epsilon: float) -> None:
    if not math.isfinite(epsilon):  # pydantic and Query(ge=0) let inf through
        raise InvalidInput("epsilon must be a finite number >= 0")


#: Rows above which the radii and the response are computed off the event loop.
INLINE_ROWS = 256
#: JSON and .npz bodies above this size are parsed off the event loop.
INLINE_BODY_BYTES = 1 << 16

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
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
    epsilon: float = Query(0.0, ge=0, description="For .npy and .npz bodies."),
) -> Response:
    """radius = (margin - sqrt(2) E) / (sqrt(2) L) with L the chosen verified bound (DESIGN §4)
    and E a rigorous bound on the rounding error of the logits (tiny in float64);
    radius_pairwise = min_j (f_y - f_j - sqrt(2) E) / L_yj when the bound has pairwise constants.
    Without a verified bound: 409 with a hint. JSON bodies follow ``CertifyRequest``;
    ``application/x-npy`` bodies carry the inputs, ``application/x-npz`` bodies the inputs and
    optionally labels (``inputs.npy``, ``labels.npy``); both take the options as query
    parameters.
    ``Accept: application/x-npz`` returns the results as columns in an .npz archive."""
    with worker.request():
        return await _certify(
            model_id, request, settings, storage, worker, bound, return_logits, epsilon
        )


async def _off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: inline for a small body (no thread hop), else on a worker thread so a
    big body does not hold up the event loop while it is parsed."""
    if size <= INLINE_BODY_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _certify_request(body: bytes) -> CertifyRequest:
    """A JSON certify body, validated (InvalidInput naming the first bad field)."""
    try:
        return CertifyRequest.model_validate(loads_json(body))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"{where}: {err['msg']}", code="validation-error") from None


def _json_inputs(req: CertifyRequest, input_shape: list[int], settings: Settings) -> np.ndarray:
    return batch_inputs(as_array(req.inputs), input_shape, settings.max_inputs)


async def _certify(
    model_id: str,
    request: Request,
    settings: Settings,
    storage: Storage,
    worker: InferenceWorker,
    bound: str,
    return_logits: bool,
    epsilon: float,
) -> Response:
    """The certify request itself (``certify`` counts it as in progress on the worker)."""
    rec = model_or_404(storage, model_id)
    ctype = body_media_type(request.scope)
    as_npz = prefers_npz(request.headers.get("accept"))
    labels: list[int] | None = None
    chosen: dict[str, Any] = {}

    def choose_bound() -> None:
        chosen.update(pick_bound(storage, model_id, bound))

    if ctype in NPY_TYPES:  # rows go to the worker in blocks while the body uploads
        _check_epsilon(epsilon)
        reader = NpyRows(rec.input_shape, settings.max_inputs)

        def on_header() -> None:
            choose_bound()
            if reader.whole_body_bytes:  # Fortran order: held whole, then cast at once
                hold_request_memory(request.scope, reader.whole_body_bytes)

        logits, logit_error = await infer_npy_body(
            request.stream(),
            reader,
            functools.partial(worker.infer_bounded, model_id),
            on_header,
        )
    elif ctype == NPZ_MEDIA_TYPE:  # inputs and labels; unzipped and parsed off the event loop
        _check_epsilon(epsilon)
        body = await request.body()
        reserve = functools.partial(hold_request_memory, request.scope)
        args = (body, rec.input_shape, settings.max_inputs, settings.max_upload_bytes, reserve)
        x, labels = await _off_loop_if_large(len(body), read_npz_body, *args)
        hold_request_memory(request.scope, len(body) + x.nbytes)  # the members are freed
        choose_bound()
        logits, logit_error = await worker.infer_bounded(model_id, x)
    elif is_json_media(ctype):
        body = await request.body()  # admitted at JSON_DECODE_FACTOR x its size (middleware)
        req = await _off_loop_if_large(len(body), _certify_request, body)
        labels, bound = req.labels, req.bound
        return_logits, epsilon = req.return_logits, req.epsilon
        _check_epsilon(epsilon)
        x = await _off_loop_if_large(len(body), _json_inputs, req, rec.input_shape, settings)
        del req  # the Python lists: only the array is kept
        hold_request_memory(request.scope, len(body) + x.nbytes)
        choose_bound()
        logits, logit_error = await worker.infer_bounded(model_id, x)
    else:
        raise UnsupportedMediaType(
            f"content type {ctype!r} is not accepted; use application/json, application/x-npy "
            "or application/x-npz"
        )
    extra = {"model_id": model_id, "precision": worker.dtype_name}

    def render() -> bytes:
        cert = certify_columns(
            logits,
            chosen,
            labels=labels,
            return_logits=return_logits,
            epsilon=epsilon,
            logit_error=logit_error,
        )
        if as_npz:
            return npz_bytes(cert, extra)
        return orjson.dumps({**rows_payload(cert), **extra})

    # small batches inline (no thread hop: single-input latency), big ones off the event loop
    content = render() if len(logits) <= INLINE_ROWS else await asyncio.to_thread(render)
    media = NPZ_MEDIA_TYPE if as_npz else JSON_MEDIA_TYPE
    return Response(content, media_type=media, headers={"Vary": "Accept"})
