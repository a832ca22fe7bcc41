"""Admission of large bodies (issue 15 part 1): a declared body is admitted only once its size
is reserved in the body budget; requests that do not fit wait in arrival order for a bounded
time and are then refused with 503 + Retry-After before their body is read, on a connection
the client can read the answer from (no reset) and use again.

The budget's queue is tested on its own (asyncio, no server); the guard through real uvicorn
and stock clients (httpx, a raw socket for a client that stalls mid-body), with budgets of a
few hundred KB so that the tests are small and deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from service.app import create_app
from service.bodies.budget import BodyBudget
from service.bodies.limits import BodyLimitMiddleware
from service.settings import Settings
from tests.redis_server import free_port
from tests.service.asgi_calls import http_scope, post_in_halves, serving

NPY = "application/x-npy"


def test_waiting_requests_are_admitted_in_arrival_order() -> None:
    """A small request behind a big one waits for it (no overtaking); each release admits
    the head of the queue while it fits."""
    order: list[str] = []

    async def run() -> None:
        budget = BodyBudget(1000)
        assert await budget.admit(800, 0)

        async def ask(name: str, nbytes: int) -> None:
            assert await budget.admit(nbytes, 5.0)
            order.append(name)

        big = asyncio.create_task(ask("big", 900))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(ask("small", 100))  # would fit now, but comes second
        await asyncio.sleep(0.05)
        assert order == [] and budget.waiting == 2 and budget.used == 800
        budget.try_resize(800, 0)  # the first request ends
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.used == 1000 and budget.waiting == 0

    asyncio.run(run())


def test_a_wait_is_bounded_and_a_full_queue_refuses_at_once() -> None:
    async def run() -> None:
        budget = BodyBudget(1000, queue_size=1)
        assert await budget.admit(600, 0)
        waiting = asyncio.create_task(budget.admit(600, 0.2))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        assert not await budget.admit(10, 5.0)  # the queue is full: no wait at all
        assert time.monotonic() - t0 < 0.1
        assert not await waiting  # timed out: nothing reserved, the queue is empty again
        assert budget.used == 600 and budget.waiting == 0
        assert await budget.admit(400, 0)  # fits beside the first

    asyncio.run(run())


def test_a_waiter_that_leaves_takes_nothing_with_it() -> None:
    """A cancelled waiter (the client left) leaves the queue, and one admitted at the moment
    it was cancelled gives its share back."""

    async def run() -> None:
        budget = BodyBudget(1000)
        assert await budget.admit(700, 0)
        gone = asyncio.create_task(budget.admit(700, 5.0))
        behind = asyncio.create_task(budget.admit(300, 5.0))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await behind  # the head left: the next one fits and is admitted
        assert budget.used == 1000 and budget.waiting == 0
        late = asyncio.create_task(budget.admit(1000, 5.0))
        await asyncio.sleep(0.01)
        budget.try_resize(1000, 0)  # admits ``late`` (the callback is not run yet) ...
        late.cancel()  # ... which is cancelled before it sees it
        with contextlib.suppress(asyncio.CancelledError):
            await late
        assert budget.used == 0 and budget.waiting == 0

    asyncio.run(run())


class _Drain:
    """An app that reads its whole body and answers 200 with its size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.sizes.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


@contextlib.contextmanager
def _uvicorn(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn (its default HTTP implementation) on a free loopback port,
    in a thread; yields the base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _stalled_upload(base: str, declared: int, sent: int) -> socket.socket:
    """A raw client that declares ``declared`` body bytes, sends ``sent`` of them and waits."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /up HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/x-npy\r\n"
        f"content-length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + bytes(sent))
    return sock


def _wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.e2e
def test_refused_bodies_get_their_503_not_a_reset_and_the_connection_stays_usable() -> None:
    """Real uvicorn: one upload stalls holding 200 KB of a 300 KB budget; a 4 MB upload (far
    more than the socket buffers hold) waits 0.3 s in the queue and is answered 503 +
    Retry-After before its body is read: a stock ``http.client`` sends its whole body and
    reads the 503 (a reset would raise), then reuses the connection. An upload queued while
    the stalled one finishes is admitted and served."""
    app = _Drain()
    guarded = BodyLimitMiddleware(
        app, max_bytes=8 << 20, timeout_s=30, budget_bytes=300_000, wait_s=0.3
    )
    with _uvicorn(guarded) as base:
        assert guarded.budget is not None
        stalled = _stalled_upload(base, 200_000, 100_000)
        _wait_until(lambda: guarded.budget is not None and guarded.budget.used == 200_000)
        npy = {"content-type": "application/x-npy"}
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        t0 = time.monotonic()
        conn.request("POST", "/up", body=bytes(4 << 20), headers=npy)  # a reset raises here
        busy = conn.getresponse()
        assert busy.status == 503
        assert time.monotonic() - t0 >= 0.3  # it waited for room first
        assert busy.getheader("retry-after") == "1"
        assert busy.getheader("content-type") == "application/problem+json"
        assert json.loads(busy.read())["code"] == "service-busy"
        assert busy.getheader("connection") is None  # kept open: the rest was discarded
        conn.request("POST", "/up", body=bytes(1000), headers=npy)  # the same connection
        again = conn.getresponse()
        assert again.status == 200 and again.read() == b"1000"
        conn.close()

        queued: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: queued.append(
                httpx.post(f"{base}/up", content=bytes(150_000), headers=npy, timeout=30)
            )
        )
        guarded.wait_s = 10.0
        waiter.start()
        _wait_until(lambda: guarded.budget is not None and guarded.budget.waiting == 1)
        stalled.sendall(bytes(100_000))  # the stalled upload completes ...
        assert b" 200 " in stalled.recv(4096)
        waiter.join(30)
        assert queued and queued[0].status_code == 200  # ... and the queued one gets in
        assert queued[0].text == "150000"
        stalled.close()
        _wait_until(lambda: guarded.budget is not None and guarded.budget.used == 0)
    assert 4 << 20 not in app.sizes  # the refused body never reached the app


def test_freed_memory_is_handed_back_once_a_burst_is_over(monkeypatch) -> None:
    """After a burst that held at least TRIM_AFTER_BYTES, the guard hands freed heap memory
    back once the budget has stayed empty for TRIM_IDLE_S, not while requests follow each
    other, and not after small bursts."""
    calls: list[float] = []
    monkeypatch.setattr("service.malloc_tuning.release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr("service.bodies.limits.TRIM_AFTER_BYTES", 150_000)
    monkeypatch.setattr("service.bodies.limits.TRIM_IDLE_S", 0.2)
    guarded = BodyLimitMiddleware(_Drain(), max_bytes=1 << 20, budget_bytes=1 << 20)

    async def run() -> None:
        await post_in_halves(guarded, "/", bytes(100_000), "application/x-npy")
        await asyncio.sleep(0.3)
        assert calls == []  # a small burst
        for _ in range(3):  # back to back: the budget never stays empty for 0.2 s
            await post_in_halves(guarded, "/", bytes(200_000), "application/x-npy")
            await asyncio.sleep(0.05)
        assert calls == []
        await asyncio.sleep(0.4)
        assert calls == [1]  # once, after the burst
        await asyncio.sleep(0.3)
        assert calls == [1]

    asyncio.run(run())


def test_certify_requests_beyond_the_concurrency_wait_and_health_does_not(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """Real app, LIPCERT_REQUEST_CONCURRENCY=1: while one .npy certify body is half received,
    a second certify request waits for its turn (its body is not read), the liveness check is
    answered meanwhile, and the second request runs once the first is done."""
    n0 = rw_weights[0].shape[1]
    buf = io.BytesIO()
    np.save(buf, np.ones((20_000, n0), np.float32))  # >= 64 KiB: streamed while holding a slot
    body = buf.getvalue()
    app = create_app(Settings(data_dir=tmp_path, device="cpu", request_concurrency=1))

    async def run() -> None:
        async with serving(app, rw_weights) as (http, path):
            gate = asyncio.Event()
            first = asyncio.create_task(post_in_halves(app, path, body, NPY, gate))
            await asyncio.sleep(0.1)  # the first holds the one slot, its body half in
            read: list[bool] = []
            second = asyncio.create_task(_post_watching(app, path, body, read))
            await asyncio.sleep(0.1)
            live = await http.get("/v2/health/live")
            assert live.status_code == 200 and live.json() == {"live": True}
            assert read == [] and not second.done()  # waiting, body unread
            gate.set()
            assert (await first)[0]["status"] == 200
            sent = await second
            assert sent[0]["status"] == 200 and read == [True]

    asyncio.run(run())


def test_clients_that_stall_their_small_bodies_hold_no_certify_slot(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """From a review: with LIPCERT_REQUEST_CONCURRENCY stalled clients (a declared 50-byte
    JSON body that never comes) every other certify request waited until they timed out (120 s
    by default), with no 503. A small body is now read before a slot is taken, and a request
    that waits for a slot longer than LIPCERT_BODY_WAIT_S gets 503 + Retry-After."""
    n0 = rw_weights[0].shape[1]
    body = json.dumps({"inputs": [[0.5] * n0]}).encode()
    app = create_app(
        Settings(data_dir=tmp_path, device="cpu", request_concurrency=1, body_wait_s=0.5)
    )

    async def stalled() -> list[Any]:
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # never sends its body
            return {}

        headers = {"content-length": "50", "content-type": "application/json"}
        return await app(http_scope(path, headers), receive, _ignore)

    async def run() -> None:
        nonlocal path
        async with serving(app, rw_weights) as (http, path):
            stall = [asyncio.create_task(stalled()) for _ in range(3)]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            ok = await http.post(path, content=body, headers={"content-type": "application/json"})
            assert ok.status_code == 200, ok.text
            assert time.monotonic() - t0 < 5  # not after the stalled clients' body timeout
            # a slot held by a request in progress: the next one waits at most body_wait_s
            gate = asyncio.Event()
            npy = io.BytesIO()
            np.save(npy, np.ones((20_000, n0), np.float32))  # >= 64 KiB: streamed in a slot
            first = asyncio.create_task(post_in_halves(app, path, npy.getvalue(), NPY, gate))
            await asyncio.sleep(0.1)
            busy = await http.post(path, content=body, headers={"content-type": "application/json"})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["code"] == "service-busy"
            gate.set()
            assert (await first)[0]["status"] == 200
            for task in stall:
                task.cancel()

    path = ""
    asyncio.run(run())


async def _ignore(message: dict[str, Any]) -> None:
    return None


async def _post_watching(app: Any, path: str, body: bytes, read: list[bool]) -> list[Any]:
    """POST ``body`` in one part, noting in ``read`` when the app first asks for it."""
    sent: list[Any] = []
    parts = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if not parts:
            await asyncio.Event().wait()
        read.append(True)
        return parts.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = {"content-length": str(len(body)), "content-type": NPY}
    await app(http_scope(path, headers), receive, send)
    return sent
