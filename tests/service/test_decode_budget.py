"""The body budget counts what decoding a body takes, not only its bytes: JSON bodies are
admitted at JSON_DECODE_FACTOR times their size, an .npz body reserves its inflated members
and float64 inputs before inflating them, and a request that cannot get that memory while
others hold the budget is answered 503 service-busy + Retry-After (alone, it always gets in)."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.app import create_app
from service.bodies.budget import JSON_DECODE_FACTOR, BodyBudget, Reservation
from service.bodies.limits import BodyLimitMiddleware
from service.bodies.npz import read_npz_body
from service.errors import ServiceBusy
from service.settings import Settings
from tests.service.asgi_calls import post_in_halves, serving
from tests.service.onnx_nets import assert_oip_error, assert_problem

NPY, JSON = "application/x-npy", "application/json"


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_reservation_grows_while_it_fits_or_is_alone_and_always_shrinks() -> None:
    budget = BodyBudget(1000)
    first, second = Reservation(budget), Reservation(budget)
    assert first.hold(5000)  # alone: admitted beyond the limit
    assert not second.hold(1)  # nothing fits beside it
    assert first.hold(600)  # shrinking always succeeds
    assert second.hold(300)
    assert not second.hold(500) and second.held == 300 and budget.used == 900
    assert first.hold(100) and second.hold(900) and budget.used == 1000
    first.release()
    second.release()
    assert budget.used == 0


def test_json_bodies_are_admitted_at_their_decoded_weight() -> None:
    """With a 300 KB .npy body admitted (reserved as declared) and a 1.5 MB budget, a 100 KB
    JSON body (1.6 MB once decoded) is turned away while a 100 KB .npy body gets in."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = BodyLimitMiddleware(app, max_bytes=4 << 20, budget_bytes=1_500_000)

    async def request(ctype: str, size: int, gate: asyncio.Event | None = None) -> int:
        sent = await post_in_halves(guarded, "/", bytes(size), ctype, gate)
        if sent[0]["status"] == 503:
            assert json.loads(sent[1]["body"])["code"] == "service-busy"
        return int(sent[0]["status"])

    async def run() -> None:
        gate = asyncio.Event()
        held = asyncio.create_task(request("application/x-npy", 300_000, gate))
        await asyncio.sleep(0.05)
        assert guarded.budget is not None and guarded.budget.used == 300_000  # declared
        assert 300_000 + 100_000 * JSON_DECODE_FACTOR > 1_500_000
        assert await request("application/json", 100_000) == 503
        assert await request("application/problem+json; charset=utf-8", 100_000) == 503
        assert await request("application/x-npy", 100_000) == 200
        gate.set()
        assert await held == 200
        assert await request("application/json", 100_000) == 200
        assert guarded.budget.used == 0

    asyncio.run(run())


def test_npz_decoding_is_reserved_before_any_member_is_inflated(monkeypatch) -> None:
    x = np.arange(3 * 4, dtype=np.uint8).reshape(3, 4)
    body = _npz(inputs=x, labels=np.arange(3))
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    asked: list[int] = []
    got, labels = read_npz_body(body, [4], 10, 1 << 20, asked.append)
    np.testing.assert_array_equal(got, x)
    assert labels == [0, 1, 2]
    # body + inflated members + the inputs as float64 counted as uint8 (8 bytes per byte)
    assert asked == [len(body) + sum(sizes.values()) + 8 * sizes["inputs.npy"]]

    inflated: list[str] = []
    monkeypatch.setattr("service.bodies.npz._read_member", lambda _, info: inflated.append(info))

    def refuse(nbytes: int) -> None:
        raise ServiceBusy("no room")

    with pytest.raises(ServiceBusy):
        read_npz_body(body, [4], 10, 1 << 20, refuse)
    assert inflated == []


def test_npz_labels_are_counted_before_they_are_converted(client, model) -> None:
    mid, _ = model
    n0 = client.get(f"/v1/models/{mid}").json()["input_shape"][-1]
    body = _npz(inputs=np.zeros((3, n0), np.float32), labels=np.zeros(5_000_000, np.int8))
    resp = client.post(
        f"/v1/models/{mid}/certify", content=body, headers={"content-type": "application/x-npz"}
    )
    assert "5000000 labels for 3 inputs" in assert_problem(resp, 422)["detail"]


def test_the_app_refuses_npz_decoding_that_does_not_fit_beside_a_body_in_flight(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """Real app, real routes: an .npy body half received holds its declared bytes; an .npz body that
    fits the budget as bytes but not once inflated and cast is answered 503 + Retry-After by
    the certify route, and succeeds once the other body is done. Nothing stays reserved."""
    n0 = rw_weights[0].shape[1]
    rows = 20_000 // n0  # float32: ~80 KB
    npz_body = _npz(inputs=np.ones((rows, n0), np.float32))  # ~80 KB, ~0.8 MB decoding
    npy_body = _npy(np.ones((50_000 // n0, n0), np.float32))  # ~200 KB
    settings = Settings(data_dir=tmp_path, device="cpu", body_budget_mb=0.5)
    app = create_app(settings)

    async def run() -> None:
        async with serving(app, rw_weights) as (http, path):
            gate = asyncio.Event()
            held = asyncio.create_task(
                post_in_halves(app, path, npy_body, "application/x-npy", gate)
            )
            await asyncio.sleep(0.1)  # the .npy body is half received, reserved whole
            assert _body_budget(app).used == len(npy_body), held  # as declared
            npz = {"content-type": "application/x-npz"}
            busy = await http.post(path, content=npz_body, headers=npz)
            assert busy.status_code == 503, busy.text[:300]
            assert_problem(busy, 503, "service-busy")
            assert busy.headers["retry-after"] == "1"
            gate.set()
            assert (await held)[0]["status"] == 200
            ok = await http.post(path, content=npz_body, headers=npz)
            assert ok.status_code == 200, ok.text
            assert len(ok.json()["results"]) == rows
        budget = _body_budget(app)
        assert budget.used == 0

    asyncio.run(run())


def _body_budget(app: Any) -> BodyBudget:
    layer = app.middleware_stack
    while not isinstance(layer, BodyLimitMiddleware):
        layer = layer.app
    assert layer.budget is not None
    return layer.budget


async def _drain_and_answer(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_a_slow_chunked_body_holds_only_what_it_has_sent() -> None:
    """A client that opens a chunked JSON body and then sends a few bytes does not lock other
    large bodies out (found by review: a chunked body used to count as the 64 MiB cap x 16
    from its first byte). A declared body is reserved whole when admitted; a client that
    declares one and then stalls holds it until the body time limit (408), no longer."""
    guarded = BodyLimitMiddleware(
        _drain_and_answer, max_bytes=4 << 20, timeout_s=0.3, budget_bytes=1_500_000
    )
    chunked = {"transfer-encoding": "chunked"}

    async def run() -> None:
        gate = asyncio.Event()
        slow = asyncio.create_task(
            post_in_halves(guarded, "/", bytes(20), "application/json", gate, chunked)
        )
        await asyncio.sleep(0.05)
        assert guarded.budget is not None and guarded.budget.used == 0
        sent = await post_in_halves(guarded, "/", bytes(300_000), "application/x-npy")
        assert sent[0]["status"] == 200
        gate.set()
        await slow
        stalled = await post_in_halves(
            guarded,
            "/",
            bytes(20),
            "application/json",
            asyncio.Event(),
            {"content-length": "1000000"},
        )
        assert stalled[0]["status"] == 408
        assert guarded.budget.used == 0

    asyncio.run(run())


def test_a_chunked_body_outgrowing_the_budget_midway_gets_503() -> None:
    guarded = BodyLimitMiddleware(_drain_and_answer, max_bytes=4 << 20, budget_bytes=400_000)
    chunked = {"transfer-encoding": "chunked"}

    async def run() -> None:
        gate = asyncio.Event()
        held = asyncio.create_task(
            post_in_halves(guarded, "/", bytes(300_000), "application/x-npy", gate, chunked)
        )
        await asyncio.sleep(0.05)  # 150 000 bytes held (chunked: counted as they arrive)
        # 200 000 fit beside them, 400 000 do not: refused when the second half arrives
        sent = await post_in_halves(
            guarded, "/", bytes(400_000), "application/x-npy", None, chunked
        )
        assert sent[0]["status"] == 503
        assert (b"retry-after", b"1") in sent[0]["headers"]
        assert json.loads(sent[1]["body"])["code"] == "service-busy"
        assert guarded.budget is not None and guarded.budget.used == 150_000
        gate.set()
        assert (await held)[0]["status"] == 200
        assert guarded.budget.used == 0

    asyncio.run(run())


def test_a_body_without_the_api_key_is_refused_before_it_is_read() -> None:
    """FastAPI reads a declared body before the route's key check runs; the middleware does
    not let an unauthenticated client upload (and hold budget) at all."""
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await _drain_and_answer(scope, receive, send)

    guarded = BodyLimitMiddleware(app, max_bytes=4 << 20, budget_bytes=1 << 20, api_key="k3y")

    async def post(headers: dict[str, str]) -> list[dict[str, Any]]:
        return await post_in_halves(
            guarded, "/up", bytes(100_000), "application/json", None, headers
        )

    async def run() -> None:
        for headers in (
            {"content-length": "100000"},
            {"transfer-encoding": "chunked"},
            {"content-length": "100000", "x-api-key": "wrong"},
        ):
            sent = await post(headers)
            assert sent[0]["status"] == 401
            assert (b"www-authenticate", b"X-API-Key") in sent[0]["headers"]
            assert json.loads(sent[1]["body"])["code"] == "unauthorized"
        assert calls == []
        assert (await post({"content-length": "100000", "x-api-key": "k3y"}))[0]["status"] == 200
        # no body: the route's own check decides (health checks and docs are open)
        no_body = await post_in_halves(guarded, "/health", b"", "application/json")
        assert no_body[0]["status"] == 200
        assert calls == ["/up", "/health"]

    asyncio.run(run())


def test_the_app_refuses_an_unauthenticated_oip_body_with_401(make_client, rw_onnx) -> None:
    client = make_client(api_key="k3y")
    ok = {"X-API-Key": "k3y"}
    mid = client.post("/v1/models", files={"file": ("m.onnx", rw_onnx)}, headers=ok).json()["id"]
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.0, 0.0]}
    resp = client.post(f"/v2/models/{mid}/infer", json={"inputs": [tensor]})
    assert_oip_error(resp, 401, "X-API-Key")
    assert resp.headers["www-authenticate"] == "X-API-Key"


def test_single_input_requests_never_wait_on_the_budget(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """Found by review: the route counted the decoding of small bodies too, so a 1-row certify
    got 503 while one large JSON body held the (full) budget."""
    n0 = rw_weights[0].shape[1]
    app = create_app(Settings(data_dir=tmp_path, device="cpu", body_budget_mb=1))
    big = json.dumps({"inputs": np.zeros((20_000, n0)).tolist()}).encode()

    async def run() -> None:
        async with serving(app, rw_weights) as (http, path):
            gate = asyncio.Event()
            held = asyncio.create_task(post_in_halves(app, path, big, JSON, gate))
            await asyncio.sleep(0.1)
            assert _body_budget(app).used > _body_budget(app).limit  # alone, over it
            for body in ({"inputs": [[0.0] * n0]}, {"inputs": [[0.5] * n0], "labels": [0]}):
                small = await http.post(path, json=body)
                assert small.status_code == 200, small.text
            gate.set()
            assert (await held)[0]["status"] == 200
        assert _body_budget(app).used == 0

    asyncio.run(run())


def test_a_fortran_order_npy_body_counts_its_float64_copy(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """A Fortran-order body cannot stream in row blocks: it is held whole and cast at once
    (on the worker thread), so its float64 copy is counted once the header is read (found
    by review: 16 MB of uint8 peaked at 267 MB, uncounted, with a 2.6 s event-loop stall)."""
    n0 = rw_weights[0].shape[1]
    held_body = _npy(np.ones((50_000 // n0, n0), np.float32))  # ~200 KB, 100 KB held half-way
    x = np.ones((25_000 // n0, n0), np.float32)  # ~100 KB; as Fortran order ~300 KB decoding
    fortran, c_order = _npy(np.asfortranarray(x)), _npy(np.ascontiguousarray(x))
    assert np.isfortran(np.load(io.BytesIO(fortran)))
    app = create_app(Settings(data_dir=tmp_path, device="cpu", body_budget_mb=0.35))

    async def run() -> None:
        async with serving(app, rw_weights) as (http, path):
            gate = asyncio.Event()
            held = asyncio.create_task(post_in_halves(app, path, held_body, NPY, gate))
            await asyncio.sleep(0.1)
            headers = {"content-type": NPY}
            ok = await http.post(path, content=c_order, headers=headers)
            assert ok.status_code == 200, ok.text  # row blocks: only the body counted
            busy = await http.post(path, content=fortran, headers=headers)
            assert_problem(busy, 503, "service-busy")
            gate.set()
            assert (await held)[0]["status"] == 200
            alone = await http.post(path, content=fortran, headers=headers)
            assert alone.json()["results"] == ok.json()["results"]
        assert _body_budget(app).used == 0

    asyncio.run(run())
