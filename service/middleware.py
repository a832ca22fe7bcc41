"""Pure ASGI middleware: the streaming body-size and body-time caps, and request logging +
metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.deps import KEY_DETAIL, api_key_matches
from service.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

log = logging.getLogger("lipcert.access")


class BodyError(HTTPException):
    """Raised from the wrapped ``receive`` when a body cannot be taken any further. An
    HTTPException, so FastAPI's body parsing re-raises it unchanged and the problem handler
    answers it with its ``code`` (and ``headers``); the middleware answers it when the
    application let it through."""

    code = "bad-request"


class BodyTooLarge(BodyError):
    """The body passed the size cap (413)."""

    code = "payload-too-large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyTimeout(BodyError):
    """The body has not fully arrived ``timeout_s`` after the application started reading it
    (408)."""

    code = "request-timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodyWithoutKey(BodyError):
    """A body sent without the configured X-API-Key (401), refused before it is read."""

    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__(401, KEY_DETAIL, headers={"WWW-Authenticate": "X-API-Key"})


class BodyOverBudget(BodyError):
    """The body (as it arrives, or as declared) does not fit beside the bodies of other
    requests (503 + Retry-After)."""

    code = "service-busy"

    def __init__(self, budget: BodyBudget) -> None:
        super().__init__(503, busy_detail(budget), headers={"Retry-After": "1"})


#: Bodies below this size are not counted against the shared budget (single-input requests).
BUDGET_MIN_BYTES = 64 * 1024
#: Memory that decoding a JSON body takes per body byte: the parsed lists of Python floats,
#: their validated copy and the float64 array (12-14x measured for short numbers such as
#: ``0,`` and ``0.5,``; ~5x for ``0.12345678,``). A JSON body counts this much per byte.
JSON_DECODE_FACTOR = 16
#: Where a request's :class:`Reservation` is kept in the ASGI scope.
RESERVATION_KEY = "lipcert.reservation"


class BodyBudget:
    """Bytes of request bodies, and of what decoding them takes, held at once across
    requests. A request may grow its share while the total stays within ``limit``, and always
    when nothing else is held, so one body up to the size cap always gets in. Shares grow on
    the event loop and, while a body is decoded, on worker threads (hence the lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def fits(self, nbytes: int) -> bool:
        """Whether a new request's ``nbytes`` would fit now (nothing is reserved)."""
        return not self.used or self.used + nbytes <= self.limit

    def try_resize(self, held: int, total: int) -> bool:
        """Change one request's share from ``held`` to ``total`` bytes; False (nothing
        changed) when it grows beyond the limit while other requests hold bytes."""
        with self._lock:
            others = self.used - held
            if total > held and others and others + total > self.limit:
                return False
            self.used = others + total
            return True


class Reservation:
    """One request's share of a :class:`BodyBudget`: its body's bytes as they arrive (JSON at
    :data:`JSON_DECODE_FACTOR` per byte), resized by the route while it decodes the body
    (:func:`hold_request_memory`), released when the response is sent."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def hold(self, total: int) -> bool:
        if not self.budget.try_resize(self.held, total):
            return False
        self.held = total
        return True

    def release(self) -> None:
        self.hold(0)


def busy_detail(budget: BodyBudget) -> str:
    return (
        f"{budget.used} bytes of request bodies are being received or processed "
        f"(budget {budget.limit}); retry shortly"
    )


def hold_request_memory(scope: Scope, total: int) -> None:
    """Count ``total`` bytes (body + decoded copies) against the request's share of the body
    budget before allocating them; :class:`BodyOverBudget` (503 service-busy + Retry-After)
    when other requests hold the rest. No-op without a budget, and for a request whose body
    was not counted (under :data:`BUDGET_MIN_BYTES`): single-input requests never wait on the
    budget."""
    reservation: Reservation | None = scope.get(RESERVATION_KEY)
    if reservation is not None and reservation.held and not reservation.hold(total):
        raise BodyOverBudget(reservation.budget)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413): by Content-Length up front, else while streaming;
    bodies still incomplete ``timeout_s`` after the application first reads (408); and, with a
    ``budget``, bodies of 64 KiB or more that do not fit beside the bodies of other requests
    (503 + Retry-After): many large uploads at once are turned away instead of being buffered
    and decoded until memory runs out.

    A body is counted as it arrives (a JSON body at :data:`JSON_DECODE_FACTOR` per byte; routes
    add what decoding takes through :func:`hold_request_memory`), so a client that declares a
    big body, or opens a chunked one, and then sends slowly holds only what it sent. A declared
    body that cannot fit is refused before it is read.

    With an ``api_key``, a request that carries a body without a valid ``X-API-Key`` is refused
    (401) before any of it is read or counted: every route that takes a body is protected (the
    open ones, health checks and docs, are GETs), and FastAPI reads a declared body before it
    runs the route's own key check.

    Nothing beyond the cap is ever buffered: the wrapped ``receive`` raises as soon as the
    running total passes ``max_bytes``. The time limit covers the body only: once its last part
    has arrived, ``receive`` (e.g. a streaming response waiting for the disconnect) is not
    timed.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float | None = None,
        budget_bytes: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.budget = None if budget_bytes is None else BodyBudget(budget_bytes)
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if self.api_key and _has_body(scope, length) and not self._key_sent(scope):
            await _send_problem(scope, send, BodyWithoutKey())
            return
        if length is not None and length > self.max_bytes:
            await _send_problem(scope, send, BodyTooLarge(self.max_bytes))
            return
        if self.budget is None:
            await self._limited(scope, receive, send, None)
            return
        weight = _decode_factor(scope)
        declared = length if length is not None and length >= BUDGET_MIN_BYTES else 0
        if declared and not self.budget.fits(declared * weight):
            await _send_problem(scope, send, BodyOverBudget(self.budget))
            return
        reservation = Reservation(self.budget)
        scope[RESERVATION_KEY] = reservation  # in place: outer middleware reads scope["route"]
        try:
            await self._limited(scope, receive, send, (reservation, weight))
        finally:
            reservation.release()

    def _key_sent(self, scope: Scope) -> bool:
        return api_key_matches(self.api_key, _header(scope, b"x-api-key"))

    async def _limited(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        counted: tuple[Reservation, int] | None,
    ) -> None:
        """The application with ``receive`` capped in size and time, and each body part
        counted against the budget (``counted``: the request's reservation, bytes per byte)."""
        total = 0
        started = False
        body_done = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal total, body_done, deadline
            if body_done or self.timeout_s is None:
                message = await receive()
            else:
                now = time.monotonic()
                deadline = now + self.timeout_s if deadline is None else deadline
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - now, 0.0))
                except TimeoutError:
                    raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                if counted is not None and total >= BUDGET_MIN_BYTES:
                    reservation, weight = counted
                    if not reservation.hold(max(reservation.held, total * weight)):
                        raise BodyOverBudget(reservation.budget)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyError as exc:
            if started:
                raise
            await _send_problem(scope, send, exc)


class AccessLogMiddleware:
    """One log line and the Prometheus request metrics per HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            metrics.REQUESTS.labels(template, method, str(status)).inc()
            metrics.LATENCY.labels(template, method).observe(elapsed)
            log.info("%s %s %d %.1fms", method, scope.get("path", ""), status, elapsed * 1e3)


def _has_body(scope: Scope, length: int | None) -> bool:
    return bool(length) or _header(scope, b"transfer-encoding") is not None


def _content_length(scope: Scope) -> int | None:
    try:
        return int(_header(scope, b"content-length") or "")
    except ValueError:
        return None


def body_media_type(scope: Scope) -> str:
    """The request body's media type: lower case, parameters dropped, '' when not given."""
    return (_header(scope, b"content-type") or "").split(";")[0].strip().lower()


def is_json_media(media: str) -> bool:
    """A JSON body: application/json, any ``+json`` type, or no content type (read as JSON)."""
    return media in ("application/json", "") or media.endswith("+json")


def _decode_factor(scope: Scope) -> int:
    """Bytes admitted per body byte: JSON decodes into Python objects; other bodies are counted
    as they are (routes add their decoded copies)."""
    return JSON_DECODE_FACTOR if is_json_media(body_media_type(scope)) else 1


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _send_problem(scope: Scope, send: Send, exc: BodyError) -> None:
    """A problem+json answer sent from the middleware (the app never saw the error), closing
    the connection: the rest of the body is not read."""
    import json
    from http import HTTPStatus

    status = exc.status_code
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + exc.code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": str(exc.detail),
        "code": exc.code,
        "instance": scope.get("path", ""),
    }
    payload = json.dumps(body).encode()
    extra = [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()
    ]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
