"""FastAPI dependencies as ``Annotated`` aliases: settings, storage, worker, API key.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, one thread
hop (~0.1-0.3 ms) per dependency per request, for what are attribute lookups here.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import NotFound, ServiceError, Unauthorized
from service.settings import Settings
from service.storage import ModelRecord, Storage
from service.worker import InferenceWorker

_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Needed on every route except health checks and docs when LIPCERT_API_KEY is set.",
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_worker(request: Request) -> InferenceWorker:
    return request.app.state.worker


async def get_runner(request: Request) -> Any:
    return getattr(request.app.state, "runner", None)


async def require_api_key(
    request: Request, key: Annotated[str | None, Security(_api_key_header)] = None
) -> None:
    """401 unless LIPCERT_API_KEY is unset or X-API-Key matches it (constant-time compare)."""
    if not api_key_matches(request.app.state.settings.api_key, key):
        raise Unauthorized(KEY_DETAIL, headers={"WWW-Authenticate": "X-API-Key"})


KEY_DETAIL = "missing or wrong X-API-Key header"


def api_key_matches(expected: str | None, key: str | None) -> bool:
    """True without a configured key, else when ``key`` equals it (constant-time compare)."""
    if not expected:
        return True
    return key is not None and hmac.compare_digest(key.encode(), expected.encode())


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
WorkerDep = Annotated[InferenceWorker, Depends(get_worker)]
RunnerDep = Annotated[Any, Depends(get_runner)]
ApiKey = Depends(require_api_key)


def runner_or_503(runner: Any) -> Any:
    """The job runner, or 503 ``no-runner`` when the app has none."""
    if runner is None:
        raise ServiceError("the job runner is not available", status=503, code="no-runner")
    return runner


def model_or_404(storage: Storage, model_id: str) -> ModelRecord:
    rec = storage.get_model(model_id)
    if rec is None:
        raise NotFound(f"no model with id {model_id!r}", code="model-not-found")
    return rec
