"""Open Inference Protocol (KServe v2 / Triton HTTP/REST) data plane: server metadata, model
metadata, readiness, infer; the binary tensor data extension (:mod:`service.oip_binary`).

``POST /v2/models/{id}/infer`` takes one tensor (any name, FP32/FP64/INT/UINT/FP16/BOOL, shape
[batch, n0], [batch, *input_shape] or [n0]) as JSON ``data`` or as binary data after the JSON
part, and returns ``logits`` (FP64, [batch, K]: the logits the radius is computed from; as
FP32 a finite logit above 3.4e38 would be lost), ``prediction`` (INT64, [batch]) and
``certified_radius`` (FP64, [batch]: (margin - sqrt(2) E) / (sqrt(2) L) with the model's best
verified bound and E a rigorous bound on the logits' rounding error, so rounding never
enlarges it), each as JSON or binary as the request asks.

The body is read whatever its Content-Type (stock clients send none): with the
``Inference-Header-Content-Length`` header it is JSON followed by tensor bytes, else JSON.
With ``parameters: {"mode": "local"}`` (optionally ``"method"``) the radius is each input's own
largest certified l2 radius (:mod:`service.routes.certify_local`; at most
LIPCERT_MAX_LOCAL_INPUTS inputs, no bound needed).
Errors on every /v2 path are ``{"error": "<message>"}`` (:func:`service.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from service.bodies.arrays import as_array, batch_inputs, check_finite
from service.bodies.budget import JSON_DECODE_FACTOR, hold_request_memory
from service.bodies.json_body import loads_json
from service.certification import radius_result
from service.deps import SettingsDep, StorageDep, WorkerDep, model_or_404
from service.errors import InvalidInput, NotFound, UnsupportedMediaType
from service.oip_binary import (
    BINARY_MEDIA_TYPE,
    DTYPES,
    HEADER_LENGTH,
    BinaryInput,
    OutputTensor,
    binary_data_size,
    encode_response,
    read_inputs,
    split_body,
    wants_binary,
)
from service.routes.certify import pick_bound
from service.routes.certify_local import LocalQuery, certify_local_rows
from service.schemas import (
    ModelReady,
    OipInferRequest,
    OipInferResponse,
    OipModelMetadata,
    OipRequestOutput,
    OipServerMetadata,
    OipTensor,
    inline_schema,
    oip_error_responses,
)
from service.settings import Settings
from service.storage import ModelRecord, Storage
from service.worker import InferenceWorker

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

OUTPUTS = ("logits", "prediction", "certified_radius")
#: The protocol extensions this server implements (``GET /v2``).
EXTENSIONS = ("binary_tensor_data",)
#: The one version every model has.
VERSION = "1"
#: Bodies above this size are decoded off the event loop.
INLINE_BODY_BYTES = 1 << 16

_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(OipInferRequest)},
            BINARY_MEDIA_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: the JSON request (its length in "
                f"bytes in the {HEADER_LENGTH} header), then each input with "
                "parameters.binary_data_size as raw little-endian bytes. Any Content-Type is "
                "read this way when the header is present.",
            },
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Length of the body's JSON part (binary tensor data extension).",
        }
    ],
}

_INFER_200 = {
    200: {
        "description": "Outputs as JSON, or, when any output is asked for in binary "
        f"(binary_data / binary_data_output), the JSON response (its length in the "
        f"{HEADER_LENGTH} response header) followed by the binary outputs.",
        "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.get(
    "",
    response_model=OipServerMetadata,
    summary="OIP server metadata (name, version, extensions)",
)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "lipcert", "version": request.app.version, "extensions": list(EXTENSIONS)}


def _model(storage: Storage, model_id: str, version: str | None) -> ModelRecord:
    rec = model_or_404(storage, model_id)
    if version is not None and version != VERSION:
        raise NotFound(f"model {model_id!r} has no version {version!r} (only {VERSION!r})")
    return rec


def _metadata(rec: ModelRecord) -> dict[str, Any]:
    k = rec.output_shape[0]
    return {
        "name": rec.id,
        "versions": [VERSION],
        "platform": "lipcert",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *rec.input_shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP64", "shape": [-1, k]},
            {"name": "prediction", "datatype": "INT64", "shape": [-1]},
            {"name": "certified_radius", "datatype": "FP64", "shape": [-1]},
        ],
    }


def _ready(storage: Storage, rec: ModelRecord) -> Response:
    """200 when a verified bound exists, else 409 (the protocol's "4xx = not ready")."""
    if storage.best_bound(rec.id) is not None:
        return Response(
            ModelReady(name=rec.id, ready=True).model_dump_json(exclude_none=True),
            200,
            media_type="application/json",
        )
    body = {
        "name": rec.id,
        "ready": False,
        "error": f"model {rec.id!r} is not ready: it has no verified Lipschitz bound yet",
    }
    return Response(
        ModelReady.model_validate(body).model_dump_json(exclude_none=True),
        409,
        media_type="application/json",
    )


_META: dict[str, Any] = {"response_model": OipModelMetadata, "responses": oip_error_responses(404)}
_READY: dict[str, Any] = {
    "response_model": ModelReady,
    "responses": {
        **oip_error_responses(404),
        409: {"model": ModelReady, "description": "Not ready: no verified bound yet."},
    },
}
_INFER: dict[str, Any] = {
    "response_model": OipInferResponse,
    "responses": {**_INFER_200, **oip_error_responses(400, 404, 408, 409, 413, 415, 503)},
    "openapi_extra": _REQUEST_BODY,
}


@router.get("/models/{model_id}", summary="OIP model metadata", **_META)
async def model_metadata(model_id: str, storage: StorageDep) -> dict[str, Any]:
    return _metadata(_model(storage, model_id, None))


@router.get(
    "/models/{model_id}/versions/{model_version}", summary="OIP model metadata (version)", **_META
)
async def model_version_metadata(
    model_id: str, model_version: str, storage: StorageDep
) -> dict[str, Any]:
    return _metadata(_model(storage, model_id, model_version))


@router.get(
    "/models/{model_id}/ready", summary="OIP model readiness (ready = a verified bound)", **_READY
)
async def model_ready(model_id: str, storage: StorageDep) -> Response:
    return _ready(storage, _model(storage, model_id, None))


@router.get(
    "/models/{model_id}/versions/{model_version}/ready",
    summary="OIP model readiness (version)",
    **_READY,
)
async def model_version_ready(model_id: str, model_version: str, storage: StorageDep) -> Response:
    return _ready(storage, _model(storage, model_id, model_version))


@router.post("/models/{model_id}/infer", summary="OIP inference with certified radii", **_INFER)
async def infer(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    storage: StorageDep,
    worker: WorkerDep,
) -> Response:
    """Logits, predictions and certified radii (JSON or binary tensors)."""
    rec = _model(storage, model_id, None)
    with worker.request():
        return await _infer(rec, request, settings, storage, worker)


@router.post(
    "/models/{model_id}/versions/{model_version}/infer",
    summary="OIP inference with certified radii (version)",
    **_INFER,
)
async def infer_version(
    model_id: str,
    model_version: str,
    request: Request,
    settings: SettingsDep,
    storage: StorageDep,
    worker: WorkerDep,
) -> Response:
    """As ``POST /v2/models/{model_id}/infer``; the only version is "1"."""
    rec = _model(storage, model_id, model_version)
    with worker.request():
        return await _infer(rec, request, settings, storage, worker)


def _parse(body: bytes, header_length: str | None) -> tuple[OipInferRequest, np.ndarray | None]:
    """The validated request and, for a binary input, its array (a view of the body)."""
    json_part, binary = split_body(body, header_length)
    try:
        req = OipInferRequest.model_validate(loads_json(json_part))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"{where}: {err['msg']}", code="validation-error") from None
    tensor = req.inputs[0]
    _refuse_unsupported(req)
    size = binary_data_size(tensor.parameters)
    if size is None:
        if len(binary):
            raise InvalidInput(
                f"the body has {len(binary)} bytes after the JSON part but no input has "
                "parameters.binary_data_size"
            )
        if tensor.data is None:
            raise InvalidInput(f"input {tensor.name!r} has neither data nor binary_data_size")
        return req, None
    if tensor.data is not None:
        raise InvalidInput(f"input {tensor.name!r} has both data and binary_data_size")
    if header_length is None:
        raise InvalidInput(f"binary_data_size needs the {HEADER_LENGTH} header")
    shape = _shape(tensor)
    spec = BinaryInput(tensor.name, tensor.datatype, tuple(shape), size)
    return req, read_inputs([spec], binary)[0]


def _refuse_unsupported(req: OipInferRequest) -> None:
    """Triton extensions this server does not implement are refused, not ignored."""
    tensors: list[OipTensor | OipRequestOutput] = [*req.inputs, *(req.outputs or [])]
    for t in tensors:
        params = t.parameters or {}
        if "shared_memory_region" in params:
            raise InvalidInput("the shared-memory extension is not supported; send the data")
        if params.get("class_count"):
            raise InvalidInput("the classification extension (class_count) is not supported")


def _shape(tensor: OipTensor) -> list[int]:
    shape = [int(d) for d in tensor.shape]
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise InvalidInput(f"invalid tensor shape {shape}")
    return shape


def _tensor_array(tensor: OipTensor, raw: np.ndarray | None, input_shape: list[int]) -> np.ndarray:
    """The input as float64 rows: JSON data (rounded to the tensor's datatype when it is a float
    type) or the binary array; a single input (shape [n0] or input_shape) becomes one row."""
    shape = _shape(tensor)
    if raw is None:
        arr = as_array(tensor.data, "input data")
        if arr.size != math.prod(shape):
            raise InvalidInput(
                f"tensor data has {arr.size} values but shape {shape} needs {math.prod(shape)}"
            )
        dtype = DTYPES.get(tensor.datatype)
        if dtype is not None and dtype.kind == "f" and dtype.itemsize < 8:
            with np.errstate(over="ignore"):
                arr = arr.astype(dtype).astype(np.float64)
            if not np.isfinite(arr).all():
                raise InvalidInput(f"input data overflow {tensor.datatype}")
        arr = arr.reshape(shape)
    else:
        arr = check_finite(raw.astype(np.float64), "input data")
    n0 = math.prod(input_shape)
    if shape in ([n0], list(input_shape)):
        arr = arr.reshape(1, n0)
    return arr


def _decode(
    body: bytes, header_length: str | None, rec: ModelRecord, settings: Settings
) -> tuple[OipInferRequest, np.ndarray]:
    """The request (its input's JSON data dropped: only the array is kept, and counted) and
    the input rows (B, n0) float64."""
    req, raw = _parse(body, header_length)
    x = batch_inputs(
        _tensor_array(req.inputs[0], raw, rec.input_shape), rec.input_shape, settings.max_inputs
    )
    req.inputs[0].data = None
    return req, x


async def _infer(
    rec: ModelRecord,
    request: Request,
    settings: Settings,
    storage: Storage,
    worker: InferenceWorker,
) -> Response:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted; send it as is")
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    json_bytes = len(body) if header_length is None else min(len(body), _int_or(header_length))
    # the JSON part decodes into Python objects; the rest is held as it is (middleware doc)
    hold_request_memory(request.scope, len(body) + JSON_DECODE_FACTOR * json_bytes)
    if len(body) <= INLINE_BODY_BYTES:
        req, x = _decode(body, header_length, rec, settings)
    else:
        req, x = await asyncio.to_thread(_decode, body, header_length, rec, settings)
    hold_request_memory(request.scope, len(body) + x.nbytes)
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; available: {list(OUTPUTS)}")
    default_binary = wants_binary(req.parameters, False, key="binary_data_output")
    flags = {o.name: wants_binary(o.parameters, default_binary) for o in req.outputs or []}
    params = req.parameters or {}
    mode = params.get("mode", "global")
    if mode not in ("global", "local"):
        raise InvalidInput(f"parameters.mode must be global or local, not {mode!r}")
    if mode == "local":  # per-input radii; the best verified bound (if any) is their floor
        bound = storage.best_bound(rec.id)
        query = LocalQuery(True, method=params.get("method"))
        local = await certify_local_rows(storage, settings, rec, x, None, query, bound)
    else:
        bound = pick_bound(storage, rec.id, "best")
    logits, err = await worker.infer_bounded(rec.id, x)
    if mode == "local":
        pred, radius = local.columns["prediction"], local.columns["radius"]
    else:
        assert bound is not None  # pick_bound raised otherwise
        out = radius_result(logits, bound, logit_error=err)  # the global radius only
        pred, radius = np.asarray(out.prediction), np.asarray(out.radius, dtype=np.float64)
    tensors = {
        "logits": OutputTensor("logits", "FP64", logits),
        "prediction": OutputTensor("prediction", "INT64", pred.astype(np.int64)),
        "certified_radius": OutputTensor(
            "certified_radius", "FP64", np.where(np.isfinite(radius), radius, 0.0)
        ),
    }
    header = {
        "model_name": rec.id,
        "model_version": VERSION,
        "id": req.id,
        "parameters": {
            "mode": mode,
            "lipschitz_bound": None if bound is None else bound.lipschitz_bound,
            "bound_method": None if bound is None else bound.method,
        },
    }
    outputs = [(tensors[name], flags.get(name, default_binary)) for name in wanted]
    content, json_length = encode_response(header, outputs)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type=BINARY_MEDIA_TYPE, headers={HEADER_LENGTH: str(json_length)}
    )


def _int_or(text: str, default: int = 0) -> int:
    try:
        return max(int(text), 0)
    except ValueError:
        return default
