"""The one place that maps errors to HTTP: RFC 9457 ``application/problem+json`` on /v1, the
Open Inference Protocol's ``{"error": "<message>"}`` on /v2.

Every /v1 error response has ``type`` (a stable URI, ``https://lipcert.dev/problems/<code>``),
``title``, ``status``, ``detail`` and ``instance`` (the request path), plus ``code`` (the
same stable code) and sometimes extensions (``errors`` for validation problems, ``hint``).

Error tree of the service (``sdp``'s tree is mapped by :data:`SDP_STATUS`)::

    ServiceError                      status, code, detail, headers, extensions
    ├── NotFound               404    unknown model / bound / job id
    ├── Unauthorized           401    missing or wrong X-API-Key
    ├── NoVerifiedBound        409    certify before a verified bound exists
    ├── UnsupportedMediaType   415    body content type not accepted
    ├── InvalidInput           422    inputs of the wrong shape, non-finite, unreadable
    ├── ServiceBusy            503    inference queue full (Retry-After)
    └── QueueUnavailable       503    Redis (the RQ job queue) unreachable (Retry-After)

Faults below the HTTP layer get their own codes, never a 500:
:class:`service.diskspace.StorageFull` -> 507 ``storage-full``,
:class:`service.storage.ModelIdCollision` -> 409 ``model-id-collision``.

Bodies over LIPCERT_MAX_UPLOAD_MB are answered 413 ``payload-too-large`` by the body-size
middleware (:class:`service.middleware.BodyTooLarge`) before any route runs.

Unexpected exceptions become a 500 with a generic detail; the traceback is logged only.

Under ``/v2`` (the KServe v2 / Triton HTTP/REST protocol) the same errors are answered as
``application/json`` ``{"error": detail}``, the body stock v2 clients read, with the same status
except that 422 (a request the server understood but refused) becomes the protocol's 400;
an error's extensions (``hint``, ``errors``, ``reasons``, ...) stay beside ``error``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from sdp.errors import (
    CertificateError,
    LipcertError,
    ModelRejected,
    NotApplicable,
    SolverError,
    UnknownSolver,
    UnsupportedMethod,
)
from service.diskspace import StorageFull, is_disk_full
from service.storage import ModelIdCollision

PROBLEM_BASE = "https://lipcert.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Paths of the Open Inference Protocol, whose errors are ``{"error": "..."}``.
OIP_PREFIX = "/v2"

log = logging.getLogger("lipcert.service")


class ServiceError(Exception):
    """An error with an HTTP status and a stable code."""

    status: int = 500
    code: str = "internal-error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extensions = extensions


class NotFound(ServiceError):
    status, code = 404, "not-found"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NoVerifiedBound(ServiceError):
    status, code = 409, "no-verified-bound"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported-media-type"


class InvalidInput(ServiceError):
    status, code = 422, "invalid-input"


class ServiceBusy(ServiceError):
    status, code = 503, "service-busy"


#: Seconds a client is asked to wait (``Retry-After``) while the job queue is unreachable.
QUEUE_RETRY_AFTER_S = 5


class QueueUnavailable(ServiceError):
    """The job queue (Redis) cannot be reached; the request may be retried."""

    status, code = 503, "queue-unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)})


#: HTTP status for each ``sdp`` error class (first match in MRO order wins).
SDP_STATUS: dict[type[LipcertError], int] = {
    ModelRejected: 422,
    UnsupportedMethod: 422,
    NotApplicable: 422,
    CertificateError: 422,
    UnknownSolver: 422,
    SolverError: 503,
}


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """An RFC 9457 problem response."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title or _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def is_oip_path(path: str) -> bool:
    """A path of the Open Inference Protocol (``/v2`` and below)."""
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def oip_status(status: int) -> int:
    """The status of an error under /v2: the protocol answers refused requests with 400."""
    return 400 if status == 422 else status


def error_answer(
    path: str, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error answer on ``path`` built outside a route (the body guard): the v2 protocol's
    ``{"error": detail}`` under /v2, else an RFC 9457 problem."""
    if is_oip_path(path):
        return JSONResponse({"error": detail}, status_code=oip_status(status), headers=headers)
    return problem(status, code, detail, instance=path, headers=headers)


def error_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """The error answer for ``request``: ``{"error": detail}`` under /v2 (with the error's
    extensions beside it, e.g. the readiness ``reasons``; clients read ``error``), else
    problem+json."""
    path = request.url.path
    if is_oip_path(path):
        body = {**extensions, "error": detail}
        return JSONResponse(body, status_code=oip_status(status), headers=headers)
    return problem(status, code, detail, instance=path, headers=headers, **extensions)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def sdp_status(exc: LipcertError) -> int:
    for cls in type(exc).__mro__:
        if cls in SDP_STATUS:
            return SDP_STATUS[cls]
    return 422


def _status_code(status: int) -> str:
    return {
        400: "bad-request",
        401: "unauthorized",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        406: "not-acceptable",
        408: "request-timeout",
        413: "payload-too-large",
        415: "unsupported-media-type",
        422: "invalid-request",
        429: "too-many-requests",
        503: "service-unavailable",
    }.get(status, "http-error" if status < 500 else "internal-error")


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Location, message and type of each pydantic error (the offending input is left out)."""
    out = []
    for err in exc.errors():
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def allowed_methods(request: Request) -> list[str] | None:
    """Every method the API documents at the request's path, HEAD with GET (Starlette's own
    405 names only the first route that matched the path, e.g. POST but not GET on
    /v1/models); None for a path outside the OpenAPI document (docs)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].fullmatch(request.url.path):
            methods.update(m.upper() for m in operations)
    if not methods:
        return None
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(
            request, exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extensions
        )

    @app.exception_handler(LipcertError)
    async def _sdp(request: Request, exc: LipcertError) -> JSONResponse:
        extra: dict[str, Any] = {}
        for name in ("node", "op"):
            if hasattr(exc, name):
                extra[name] = str(getattr(exc, name))
        return error_response(request, sdp_status(exc), exc.code, exc.detail, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        where = ".".join(errors[0]["loc"]) if errors else ""
        msg = str(errors[0]["msg"]) if errors else "invalid request"
        detail = f"{where}: {msg}" if where else msg
        return error_response(request, 422, "validation-error", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
            allowed = allowed_methods(request)
            if allowed is not None:
                headers["Allow"] = ", ".join(allowed)
        code = getattr(exc, "code", None)  # the middleware's body errors carry their own
        if getattr(exc, "close", False) is True:  # a body error that leaves its body unread
            headers["Connection"] = "close"
        return error_response(
            request,
            exc.status_code,
            code if isinstance(code, str) else _status_code(exc.status_code),
            detail,
            headers=headers,
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client left mid-request (e.g. an abandoned upload): nobody reads an answer, and
        it is not a server error; recorded as 499 (nginx's "client closed request")."""
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(StorageFull)
    async def _full(request: Request, exc: StorageFull) -> JSONResponse:
        return error_response(request, 507, exc.code, exc.detail)

    @app.exception_handler(ModelIdCollision)
    async def _collision(request: Request, exc: ModelIdCollision) -> JSONResponse:
        return error_response(request, 409, exc.code, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        settings = getattr(request.app.state, "settings", None)
        data_dir = getattr(settings, "data_dir", None)
        if data_dir is not None and is_disk_full(exc, data_dir):  # e.g. ENOSPC off storage
            return error_response(request, 507, StorageFull.code, str(exc))
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            request, 500, "internal-error", "the server hit an unexpected error; it has been logged"
        )
