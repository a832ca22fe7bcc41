"""Certify request bodies by media type: one decoder per type, chosen from a table.

Each decoder reads the body, checks its inputs and runs them through the inference worker,
returning the logits with their rounding-error bounds and the request's options:

* ``application/x-npy`` / ``application/octet-stream`` (:func:`_npy`): rows go to the worker
  in blocks while the body still uploads (:mod:`service.bodies.npy_stream`); the bound is
  chosen as soon as the header is valid (409 before the upload ends);
* ``application/x-npz`` (:func:`_npz`): inputs and optional labels (:mod:`service.bodies.npz`),
  unzipped and parsed off the event loop when large;
* JSON (:func:`_json`: ``application/json``, any ``+json`` type, or none): a
  :class:`~service.schemas.CertifyRequest`, whose options override the query's.

Binary bodies take their options from the query. Every decoder counts what it allocates
against the request's share of the body budget (:func:`~service.bodies.budget.
hold_request_memory`) before allocating it. Any other media type is a 415.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request

from service.bodies.arrays import as_array, batch_inputs
from service.bodies.budget import hold_request_memory
from service.bodies.json_body import loads_json
from service.bodies.media import NPY_MEDIA_TYPES, NPZ_MEDIA_TYPE, is_json_media
from service.bodies.npy_stream import FortranBody, NpyRows, RowBlock, infer_npy_body
from service.bodies.npz import read_npz_body
from service.errors import InvalidInput, UnsupportedMediaType
from service.local_certify import global_epsilon
from service.schemas import CertifyRequest

T = TypeVar("T")

#: JSON and .npz bodies above this size are parsed off the event loop.
INLINE_BODY_BYTES = 1 << 16

#: The inference worker's entry: rows (float64, or received bytes cast on the worker thread)
#: -> (logits (B, K), logit error bounds (B,)).
Infer = Callable[[np.ndarray | RowBlock | FortranBody], Awaitable[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class CertifyOptions:
    """What a certify request asks for besides its inputs (query parameters, or the JSON
    body's fields)."""

    bound: str = "best"
    return_logits: bool = False
    epsilon: float = 0.0
    labels: list[int] | None = None


@dataclass(frozen=True)
class CertifyBody:
    """What a decoder needs: the request (its body stream and scope), the model's input
    shape and limits, the query's options, the worker and how to pick the bound (raises
    409/404 when there is none; called before inference starts)."""

    request: Request
    input_shape: list[int]
    max_inputs: int
    max_upload_bytes: int
    options: CertifyOptions
    infer: Infer
    choose_bound: Callable[[str], None]


@dataclass(frozen=True)
class LocalRows:
    """A JSON body with ``"mode": "local"``: its rows (B, n0) and local options, not inferred
    here (the route certifies them per input, :mod:`service.routes.certify_local`)."""

    x: np.ndarray
    labels: list[int] | None
    bound: str
    epsilon: Any
    method: str | None
    time_budget_s: float | None


@dataclass(frozen=True)
class Inferred:
    """A decoded and inferred certify body (``local``: a local-mode body, not inferred)."""

    logits: np.ndarray
    logit_error: np.ndarray
    options: CertifyOptions
    local: LocalRows | None = None


Decoder = Callable[[CertifyBody], Awaitable[Inferred]]


def check_epsilon(epsilon: float) -> None:
    if not math.isfinite(epsilon):  # pydantic and Query(ge=0) let inf through
        raise InvalidInput("epsilon must be a finite number >= 0")


async def _off_loop_if_large(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``: inline for a small body (no thread hop), else on a worker thread so a
    big body does not hold up the event loop while it is parsed."""
    if size <= INLINE_BODY_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _npy(body: CertifyBody) -> Inferred:
    """Rows go to the worker in blocks while the body uploads."""
    check_epsilon(body.options.epsilon)
    scope = body.request.scope
    reader = NpyRows(body.input_shape, body.max_inputs)

    def on_header() -> None:
        body.choose_bound(body.options.bound)
        if reader.whole_body_bytes:  # Fortran order: held whole, then cast at once
            hold_request_memory(scope, reader.whole_body_bytes)

    logits, logit_error = await infer_npy_body(body.request.stream(), reader, body.infer, on_header)
    return Inferred(logits, logit_error, body.options)


async def _npz(body: CertifyBody) -> Inferred:
    """Inputs and labels; unzipped and parsed off the event loop when large."""
    check_epsilon(body.options.epsilon)
    scope = body.request.scope
    data = await body.request.body()

    def reserve(nbytes: int) -> None:
        hold_request_memory(scope, nbytes)

    args = (data, body.input_shape, body.max_inputs, body.max_upload_bytes, reserve)
    x, labels = await _off_loop_if_large(len(data), read_npz_body, *args)
    hold_request_memory(scope, len(data) + x.nbytes)  # the members are freed
    body.choose_bound(body.options.bound)
    logits, logit_error = await body.infer(x)
    return Inferred(logits, logit_error, dataclasses.replace(body.options, labels=labels))


def certify_request(data: bytes) -> CertifyRequest:
    """A JSON certify body, validated (InvalidInput naming the first bad field)."""
    try:
        return CertifyRequest.model_validate(loads_json(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"{where}: {err['msg']}", code="validation-error") from None


def _json_inputs(req: CertifyRequest, input_shape: list[int], max_inputs: int) -> np.ndarray:
    return batch_inputs(as_array(req.inputs), input_shape, max_inputs)


async def _json(body: CertifyBody) -> Inferred:
    """A :class:`CertifyRequest`; its options replace the query's."""
    data = await body.request.body()  # admitted at JSON_DECODE_FACTOR x its size (budget)
    req = await _off_loop_if_large(len(data), certify_request, data)
    if req.mode == "local":
        x = await _off_loop_if_large(
            len(data), _json_inputs, req, body.input_shape, body.max_inputs
        )
        hold_request_memory(body.request.scope, len(data) + x.nbytes)
        rows = LocalRows(x, req.labels, req.bound, req.epsilon, req.method, req.time_budget_s)
        return Inferred(np.empty((0, 0)), np.empty(0), body.options, rows)
    epsilon = global_epsilon(req.epsilon, req.method, req.time_budget_s)
    options = CertifyOptions(req.bound, req.return_logits, epsilon, req.labels)
    check_epsilon(options.epsilon)
    x = await _off_loop_if_large(len(data), _json_inputs, req, body.input_shape, body.max_inputs)
    del req  # the Python lists: only the array is kept
    hold_request_memory(body.request.scope, len(data) + x.nbytes)
    body.choose_bound(options.bound)
    logits, logit_error = await body.infer(x)
    return Inferred(logits, logit_error, options)


#: The decoder of each accepted media type (JSON also for any ``+json`` type and none).
DECODERS: dict[str, Decoder] = {
    **{media: _npy for media in NPY_MEDIA_TYPES},
    NPZ_MEDIA_TYPE: _npz,
    "application/json": _json,
}


def decoder_for(media: str) -> Decoder:
    """The decoder of a certify body of media type ``media`` (415 when none takes it)."""
    decoder = DECODERS.get(media)
    if decoder is None and is_json_media(media):
        decoder = _json
    if decoder is None:
        raise UnsupportedMediaType(
            f"content type {media!r} is not accepted; use application/json, application/x-npy "
            "or application/x-npz"
        )
    return decoder
