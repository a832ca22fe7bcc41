"""The body guard: a pure ASGI middleware that caps request bodies in size and time, admits
large ones through the memory budget (:mod:`service.bodies.budget`) and refuses bodies sent
without the API key, before the application reads them."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import malloc_tuning
from service.bodies.budget import (
    BUDGET_MIN_BYTES,
    JSON_DECODE_FACTOR,
    RESERVATION_KEY,
    TRIM_AFTER_BYTES,
    TRIM_IDLE_S,
    BodyBudget,
    Reservation,
    busy_detail,
)
from service.bodies.errors import (
    BodyError,
    BodyOverBudget,
    BodyTimeout,
    BodyTooLarge,
    BodyWithoutKey,
)
from service.bodies.media import body_media_type, header, is_json_media
from service.deps import api_key_matches
from service.errors import error_answer


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413): by Content-Length up front, else while streaming;
    bodies still incomplete ``timeout_s`` after the application first reads (408); and, with a
    ``budget_bytes`` budget, bodies of 64 KiB or more that cannot be admitted beside the bodies
    of other requests (503 + Retry-After): a declared body waits in a FIFO queue (at most
    ``queue_size`` requests, ``wait_s`` seconds) until its size is reserved, and is refused
    before any of it is read when that does not happen (:mod:`service.bodies.budget`).

    A chunked body is counted as it arrives (a JSON body at :data:`JSON_DECODE_FACTOR` per
    byte; routes add what decoding takes through
    :func:`~service.bodies.budget.hold_request_memory`), so a client that opens one and then
    sends slowly holds only what it sent.

    With an ``api_key``, a request that carries a body without a valid ``X-API-Key`` is refused
    (401) before any of it is read or counted: every route that takes a body is protected (the
    open ones, health checks and docs, are GETs), and FastAPI reads a declared body before it
    runs the route's own key check.

    Nothing beyond the cap is ever buffered: the wrapped ``receive`` raises as soon as the
    running total passes ``max_bytes``. The time limit covers the body only: once its last part
    has arrived, ``receive`` (e.g. a streaming response waiting for the disconnect) is not
    timed. A 503 keeps the connection open (the server discards the rest of the body, so the
    client reads the answer, not a reset); 401, 408 and 413 close it.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float | None = None,
        budget_bytes: int | None = None,
        api_key: str | None = None,
        wait_s: float = 0.0,
        queue_size: int = 128,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.budget = (
            None
            if budget_bytes is None
            else BodyBudget(budget_bytes, queue_size, on_drained=self._drained)
        )
        self.api_key = api_key
        self._trim_at: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = content_length(scope)
        if self.api_key and _has_body(scope, length) and not self._key_sent(scope):
            await _send_problem(scope, receive, send, BodyWithoutKey())
            return
        if length is not None and length > self.max_bytes:
            await _send_problem(scope, receive, send, BodyTooLarge(self.max_bytes))
            return
        if self.budget is None:
            await self._limited(scope, receive, send, None)
            return
        weight = _decode_factor(scope)
        reservation = Reservation(self.budget)
        if (
            length is not None
            and length >= BUDGET_MIN_BYTES
            and not await reservation.admit(length * weight, self.wait_s)
        ):
            await _send_problem(scope, receive, send, BodyOverBudget(busy_detail(self.budget)))
            return
        scope[RESERVATION_KEY] = reservation  # in place: outer middleware reads scope["route"]
        try:
            await self._limited(scope, receive, send, (reservation, weight))
        finally:
            reservation.release()

    def _key_sent(self, scope: Scope) -> bool:
        return api_key_matches(self.api_key, header(scope, b"x-api-key"))

    def _drained(self) -> None:
        """The budget is empty (event loop): after a burst, hand the freed heap memory back
        once it has stayed empty for :data:`TRIM_IDLE_S`."""
        if self._trim_at is not None:
            self._trim_at.cancel()
        budget = self.budget
        if budget is None or budget.peak < TRIM_AFTER_BYTES:
            return
        loop = asyncio.get_running_loop()

        def trim() -> None:
            self._trim_at = None
            if budget.used == 0:
                budget.reset_peak()
                loop.run_in_executor(None, malloc_tuning.release_freed_memory)

        self._trim_at = loop.call_later(TRIM_IDLE_S, trim)

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
                        raise BodyOverBudget(busy_detail(reservation.budget))
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
            await _send_problem(scope, receive, send, exc)


def _has_body(scope: Scope, length: int | None) -> bool:
    return bool(length) or header(scope, b"transfer-encoding") is not None


def content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None (none, chunked or not a number)."""
    try:
        return int(header(scope, b"content-length") or "")
    except ValueError:
        return None


#: Header of an Open Inference Protocol body in the binary tensor format: the length of its
#: JSON part; raw tensor bytes follow it (:mod:`service.oip_binary`).
OIP_HEADER_LENGTH = b"inference-header-content-length"


def _decode_factor(scope: Scope) -> int:
    """Bytes admitted per body byte: JSON decodes into Python objects; other bodies are counted
    as they are (routes add their decoded copies). A binary-tensor OIP body is mostly raw
    tensors, whatever its content type: the route counts its JSON part's decoding."""
    if header(scope, OIP_HEADER_LENGTH) is not None:
        return 1
    return JSON_DECODE_FACTOR if is_json_media(body_media_type(scope)) else 1


async def _send_problem(scope: Scope, receive: Receive, send: Send, exc: BodyError) -> None:
    """The answer to a body error, sent from the guard (the app never saw the error, or let it
    through): problem+json, or ``{"error": ...}`` under /v2
    (:func:`service.errors.error_answer`); with ``Connection: close`` unless ``exc.close`` is
    False."""
    headers = dict(exc.headers or {})
    if exc.close:
        headers["Connection"] = "close"
    answer = error_answer(
        scope.get("path", ""), exc.status_code, exc.code, str(exc.detail), headers=headers
    )
    await answer(scope, receive, send)
