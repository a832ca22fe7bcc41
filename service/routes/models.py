"""Model registry: upload (content-addressed), list, get, delete."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, Response, UploadFile, status

from sdp.bounds.sandwich import sandwich_bound
from sdp.ir import Network
from service.deps import RunnerDep, SettingsDep, StorageDep, model_or_404
from service.documents import StoredBound
from service.errors import NotFound, QueueUnavailable
from service.schemas import BODY_ERRORS, ModelInfo, ModelList, problem_responses
from service.storage import ID_LENGTH, ModelRecord, Storage

log = logging.getLogger("lipcert.service")

router = APIRouter(prefix="/v1/models", tags=["models"])
_BY_ID = problem_responses(404)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelInfo,
    responses={
        200: {"model": ModelInfo, "description": "The same bytes were uploaded before."},
        **problem_responses(400, 409, 422, 507, *BODY_ERRORS),
    },
    summary="Upload a model (ONNX, safetensors, LipSDP .mat)",
)
async def upload_model(
    request: Request,
    response: Response,
    settings: SettingsDep,
    storage: StorageDep,
    file: Annotated[UploadFile, File(description="The model file; its format is sniffed.")],
) -> ModelRecord:
    """Store a model. The format is sniffed from the content; the file is parsed in a
    separate process with a time limit. The id is derived from the sha256 of the bytes:
    uploading the same bytes again returns the existing record with status 200 (201 when
    new). Sandwich models get their closed-form bound verified and stored right away."""
    data = await file.read()
    sha = hashlib.sha256(data).hexdigest()
    existing = storage.get_model(sha[:ID_LENGTH])
    if existing is not None and existing.sha256 == sha:
        response.status_code = status.HTTP_200_OK
        return existing
    net = await asyncio.to_thread(request.app.state.model_checker.parse, data)
    rec = await asyncio.to_thread(storage.save_model, data, file.filename or "", network=net)
    if net.kind == "sandwich":
        await asyncio.to_thread(_store_sandwich_bound, storage, rec.id, net)
    response.headers["Location"] = f"/v1/models/{rec.id}"
    if not rec.created:
        response.status_code = status.HTTP_200_OK
    return rec


def _store_sandwich_bound(storage: Storage, model_id: str, net: Network) -> None:
    """Check the sandwich closed form (design.md §3.4) and store it when it verifies."""
    try:
        result = sandwich_bound(net)
    except Exception as exc:  # not verifiable: the model is still usable with a LipSDP job
        log.warning("sandwich closed form of %s not stored: %s", model_id, exc)
        return
    if result.verified:  # with its certificate (rho, T), so ?full=true can show it
        storage.save_bound(
            model_id, StoredBound.from_result(result, net.content_hash(), source="upload")
        )


@router.get("", response_model=ModelList, summary="List stored models")
async def list_models(storage: StorageDep) -> dict[str, Any]:
    return {"models": [r.to_dict() for r in storage.list_models()]}


@router.get(
    "/{model_id}",
    response_model=ModelInfo,
    responses=_BY_ID,
    summary="A stored model's metadata",
)
async def get_model(model_id: str, storage: StorageDep) -> ModelRecord:
    return model_or_404(storage, model_id)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_BY_ID,
    summary="Delete a model, its file and its bounds; cancel its unfinished jobs",
)
async def delete_model(
    model_id: str, request: Request, storage: StorageDep, runner: RunnerDep
) -> Response:
    """Its unfinished bound jobs are cancelled (error ``model-deleted``): no solver keeps
    running for a bound that could not be stored."""
    if not await asyncio.to_thread(storage.delete_model, model_id):
        raise NotFound(f"no model with id {model_id!r}", code="model-not-found")
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.evict(model_id)
    if runner is not None:
        try:
            await asyncio.to_thread(runner.cancel_model, model_id)
        except QueueUnavailable as exc:  # deleted all the same: its jobs store nothing
            log.warning("jobs of deleted model %s not cancelled: %s", model_id, exc.detail)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
