"""Open Inference Protocol (KServe v2) data plane: model metadata, readiness, infer.

``POST /v2/models/{id}/infer`` takes one tensor (any name, FP32/FP64/INT, shape
[batch, n0], [batch, *input_shape] or [n0]) and returns ``logits`` (FP64, [batch, K]: the
logits the radius is computed from; as FP32 a finite logit above 3.4e38 would be lost),
``prediction`` (INT64, [batch]) and ``certified_radius`` (FP64, [batch]: (margin - sqrt(2) E) /
(sqrt(2) L) with the model's best verified bound and E a rigorous bound on the logits' rounding
error, so rounding never enlarges it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import APIRouter

from service.bodies.arrays import as_array, batch_inputs
from service.certification import radii
from service.deps import SettingsDep, StorageDep, WorkerDep, model_or_404
from service.errors import InvalidInput
from service.routes.certify import pick_bound
from service.schemas import (
    PROBLEM_RESPONSES,
    ModelReady,
    OipInferRequest,
    OipInferResponse,
    OipModelMetadata,
)

router = APIRouter(prefix="/v2/models", tags=["open inference protocol v2"])

OUTPUTS = ("logits", "prediction", "certified_radius")


@router.get(
    "/{model_id}",
    response_model=OipModelMetadata,
    responses=PROBLEM_RESPONSES,
    summary="OIP model metadata",
)
async def model_metadata(model_id: str, storage: StorageDep) -> dict[str, Any]:
    rec = model_or_404(storage, model_id)
    k = rec.output_shape[0]
    return {
        "name": rec.id,
        "versions": ["1"],
        "platform": "lipcert",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *rec.input_shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP64", "shape": [-1, k]},
            {"name": "prediction", "datatype": "INT64", "shape": [-1]},
            {"name": "certified_radius", "datatype": "FP64", "shape": [-1]},
        ],
    }


@router.get(
    "/{model_id}/ready",
    response_model=ModelReady,
    responses=PROBLEM_RESPONSES,
    summary="OIP model readiness (ready = a verified bound exists)",
)
async def model_ready(model_id: str, storage: StorageDep) -> dict[str, Any]:
    rec = model_or_404(storage, model_id)
    return {"name": rec.id, "ready": storage.best_bound(model_id) is not None}


def _tensor_array(tensor: Any, input_shape: list[int]) -> np.ndarray:
    shape = [int(d) for d in tensor.shape]
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise InvalidInput(f"invalid tensor shape {shape}")
    arr = as_array(tensor.data, "input data")
    if arr.size != math.prod(shape):
        raise InvalidInput(
            f"tensor data has {arr.size} values but shape {shape} needs {math.prod(shape)}"
        )
    if tensor.datatype == "FP32":
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32).astype(np.float64)
        if not np.isfinite(arr).all():
            raise InvalidInput("input data overflow FP32")
    arr = arr.reshape(shape)
    n0 = math.prod(input_shape)
    if shape in ([n0], list(input_shape)):
        arr = arr.reshape(1, n0)
    return arr


@router.post(
    "/{model_id}/infer",
    response_model=OipInferResponse,
    responses=PROBLEM_RESPONSES,
    summary="OIP inference with certified radii",
)
async def infer(
    model_id: str,
    body: OipInferRequest,
    settings: SettingsDep,
    storage: StorageDep,
    worker: WorkerDep,
) -> dict[str, Any]:
    rec = model_or_404(storage, model_id)
    wanted = [o.name for o in body.outputs] if body.outputs else list(OUTPUTS)
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; available: {list(OUTPUTS)}")
    x = batch_inputs(
        _tensor_array(body.inputs[0], rec.input_shape), rec.input_shape, settings.max_inputs
    )
    bound = pick_bound(storage, model_id, "best")
    with worker.request():
        logits, err = await worker.infer_bounded(model_id, x)
    pred, _, radius, _ = radii(logits, float(bound["lipschitz_bound"]), logit_error=err)
    b, k = logits.shape
    tensors = {
        "logits": {
            "name": "logits",
            "shape": [b, k],
            "datatype": "FP64",
            "data": logits.ravel().tolist(),
        },
        "prediction": {
            "name": "prediction",
            "shape": [b],
            "datatype": "INT64",
            "data": pred.astype(np.int64).tolist(),
        },
        "certified_radius": {
            "name": "certified_radius",
            "shape": [b],
            "datatype": "FP64",
            "data": [float(r) if math.isfinite(r) else 0.0 for r in radius],
        },
    }
    return {
        "model_name": rec.id,
        "model_version": "1",
        "id": body.id,
        "outputs": [tensors[name] for name in wanted],
        "parameters": {
            "lipschitz_bound": float(bound["lipschitz_bound"]),
            "bound_method": str(bound.get("method", "")),
        },
    }
