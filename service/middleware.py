"""Pure ASGI middleware: request logging + metrics. The body guard (size, time, budget, API
key of bodies) is :class:`service.bodies.limits.BodyLimitMiddleware`."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

log = logging.getLogger("lipcert.access")


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
