"""Pure ASGI middleware: the streaming body-size cap, and request logging + metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

log = logging.getLogger("lipcert.access")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the cap (an HTTPException, so FastAPI's
    body parsing re-raises it unchanged and the problem handler answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: by Content-Length up front, else while streaming.

    Nothing beyond the cap is ever buffered: the wrapped ``receive`` raises as soon as the
    running total passes ``max_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await _send_413(scope, send, self.max_bytes)
                return
        total = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(scope, send, self.max_bytes)


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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


async def _send_413(scope: Scope, send: Send, limit: int) -> None:
    import json

    body: dict[str, Any] = {
        "type": PROBLEM_BASE + "payload-too-large",
        "title": "Content Too Large",
        "status": 413,
        "detail": f"request body exceeds the limit of {limit} bytes",
        "code": "payload-too-large",
        "instance": scope.get("path", ""),
    }
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
