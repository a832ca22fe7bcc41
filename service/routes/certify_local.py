"""``POST /v1/models/{id}/certify`` with ``mode: local``: per-input certified radii.

Each input is certified on its own l2 ball by :func:`sdp.local.certify_local`
(:mod:`service.local_certify`): the largest certified radius (never below the global radius
margin / (sqrt(2) L) of the model's best verified bound, when it has one), or, with
``epsilon`` (one number or one per input), whether it is certified at that eps. This costs
milliseconds to seconds per input, so a request carries at most ``LIPCERT_MAX_LOCAL_INPUTS``
inputs (beyond: 413 ``local-batch-too-large`` naming the job route
``POST /v1/models/{id}/certifications``) and runs off the event loop, at most
:data:`CONCURRENT` at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Request, Response

from service.bodies.arrays import batch_inputs
from service.bodies.budget import hold_request_memory
from service.bodies.media import JSON_MEDIA_TYPE, NPY_MEDIA_TYPES, NPZ_MEDIA_TYPE, npz_bytes
from service.bodies.npy import load_npy
from service.bodies.npz import read_npz_body
from service.certification import Certified, result_rows
from service.documents import StoredBound
from service.errors import InvalidInput, ServiceError, UnsupportedMediaType
from service.local_certify import (
    certify_rows,
    check_labels,
    device_optimizer,
    local_options,
)
from service.settings import Settings
from service.storage import ModelRecord, Storage

#: Local certifications running at once in this process (each holds a CPU core).
CONCURRENT = 2
_SLOTS = threading.BoundedSemaphore(CONCURRENT)


@dataclass(frozen=True)
class LocalQuery:
    """The local-mode options of one certify request (query parameters or JSON fields)."""

    enabled: bool
    epsilon: Any = None
    method: str | None = None
    time_budget_s: float | None = None


def parse_local_body(
    body: bytes,
    media: str,
    rec: ModelRecord,
    settings: Settings,
    reserve: Callable[[int], None],
) -> tuple[np.ndarray, list[int] | None]:
    """(inputs (B, n0) float64, labels or None) of an .npy or .npz body, read whole."""
    if media == NPZ_MEDIA_TYPE:
        args = (body, rec.input_shape, settings.max_inputs, settings.max_upload_bytes, reserve)
        return read_npz_body(*args)
    if media not in NPY_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"content type {media!r} is not accepted; use application/json, application/x-npy "
            "or application/x-npz"
        )
    return batch_inputs(load_npy(body), rec.input_shape, settings.max_inputs), None


async def read_local_body(
    request: Request, media: str, rec: ModelRecord, settings: Settings
) -> tuple[np.ndarray, list[int] | None]:
    """:func:`parse_local_body` of the request's body (off the event loop), counted against
    the request's share of the body budget."""
    body = await request.body()

    def reserve(nbytes: int) -> None:
        hold_request_memory(request.scope, nbytes)

    x, labels = await asyncio.to_thread(parse_local_body, body, media, rec, settings, reserve)
    hold_request_memory(request.scope, len(body) + x.nbytes)
    return x, labels


def _render(cert: Certified, extra: dict[str, Any], as_npz: bool) -> bytes:
    if as_npz:
        return npz_bytes(cert.columns, {**cert.summary, **extra})
    return orjson.dumps({**extra, **cert.summary, "results": result_rows(cert)})


def _certify_held(*args: Any) -> Certified:
    with _SLOTS:
        return certify_rows(*args)


async def certify_local_response(
    storage: Storage,
    settings: Settings,
    rec: ModelRecord,
    x: np.ndarray,
    labels: list[int] | None,
    query: LocalQuery,
    bound: StoredBound | None,
    as_npz: bool,
) -> Response:
    """Certify the rows ``x`` (the model file's layout) locally and render the answer."""
    cert = await certify_local_rows(storage, settings, rec, x, labels, query, bound)
    extra = {"model_id": rec.id, "precision": "float64"}  # sdp's float64 propagation
    content = await asyncio.to_thread(_render, cert, extra, as_npz)
    media = NPZ_MEDIA_TYPE if as_npz else JSON_MEDIA_TYPE
    return Response(content, media_type=media, headers={"Vary": "Accept"})


async def certify_local_rows(
    storage: Storage,
    settings: Settings,
    rec: ModelRecord,
    x: np.ndarray,
    labels: list[int] | None,
    query: LocalQuery,
    bound: StoredBound | None,
) -> Certified:
    """The local certification of at most ``LIPCERT_MAX_LOCAL_INPUTS`` rows, off the loop."""
    if len(x) > settings.max_local_inputs:
        raise ServiceError(
            f"{len(x)} inputs; local certification takes at most {settings.max_local_inputs} "
            "per request",
            status=413,
            code="local-batch-too-large",
            hint=f"POST /v1/models/{rec.id}/certifications runs larger batches as a job",
            jobs=f"/v1/models/{rec.id}/certifications",
        )
    options = local_options(
        query.method,
        query.epsilon,
        query.time_budget_s,
        batch=len(x),
        max_time_budget_s=settings.local_time_budget_s,
    )
    classes = int(rec.output_shape[0]) if rec.output_shape else 0
    if classes < 2:
        raise InvalidInput(
            "the model has a single output; certified radii need at least two classes",
            code="not-a-classifier",
        )
    y = check_labels(labels, len(x), classes)
    net = await asyncio.to_thread(storage.load_network, rec.id)
    optimizer = device_optimizer(settings.device)
    return await asyncio.to_thread(_certify_held, net, x, y, options, bound, optimizer)
