"""Requests run straight through an ASGI app, for what a test client cannot do: a body that
stops half-way until the test lets it go on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np

from service.documents import StoredBound
from tests.service.onnx_nets import mlp_onnx


def http_scope(path: str, headers: dict[str, str]) -> dict[str, Any]:
    """The scope of a POST to ``path`` over HTTP/1.1 on loopback."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def post_in_halves(
    app: Any,
    path: str,
    body: bytes,
    content_type: str,
    gate: asyncio.Event | None = None,
    headers: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """POST ``body`` in two parts, the second only once ``gate`` is set; the client then stays
    connected. Content-Length is the body's unless ``headers`` say otherwise (e.g.
    ``{"transfer-encoding": "chunked"}`` without a length). Returns what the app sent."""
    half = len(body) // 2
    parts = [
        {"type": "http.request", "body": body[:half], "more_body": True},
        {"type": "http.request", "body": body[half:], "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not parts:
            await asyncio.Event().wait()  # no disconnect while the answer is sent
        if len(parts) == 1 and gate is not None:
            await gate.wait()
        return parts.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    if headers is None:
        headers = {"content-length": str(len(body))}
    await app(http_scope(path, {**headers, "content-type": content_type}), receive, send)
    return sent


@contextlib.asynccontextmanager
async def serving(app: Any, weights: list[np.ndarray]) -> AsyncIterator[tuple[Any, str]]:
    """The app started, a client on it, LipSDP's random_weights uploaded with a (naive)
    verified bound: (client, its certify path)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            up = await http.post("/v1/models", files={"file": ("m.onnx", mlp_onnx(weights))})
            mid = up.json()["id"]
            app.state.storage.save_bound(
                mid,
                StoredBound.from_json(
                    {"lipschitz_bound": 1.0, "method": "naive", "verified": True}
                ),
            )
            yield http, f"/v1/models/{mid}/certify"
