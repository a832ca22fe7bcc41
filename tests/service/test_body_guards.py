"""Guards on request bodies found by review: a deflate bomb inside an .npz inflates only to its
declared size; .npy headers with bool or negative dimensions and long-double data are refused
(422, not 500 or a meaningless 200); a body that stops arriving gets 408 after
LIPCERT_BODY_TIMEOUT_S without timing the rest of the request; a client leaving mid-upload is
a 499, not a logged server error."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import tracemalloc
import zlib
from typing import Any

import numpy as np
import pytest

from service.bodies.limits import BodyLimitMiddleware
from service.bodies.npz import read_npz_body
from tests.service.asgi_calls import http_scope, post_in_halves
from tests.service.onnx_nets import assert_problem

NPY = {"content-type": "application/x-npy"}
NPZ = {"content-type": "application/x-npz"}


def npy_with_header(header: dict[str, Any], data: bytes) -> bytes:
    """A .npy body with exactly this header dict (numpy's writer would refuse bad ones)."""
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def single_member_zip(name: bytes, stream: bytes, size: int, crc: int, method: int) -> bytes:
    """A one-member zip written by hand, so that the declared size and CRC can say anything."""
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(stream), size, len(name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L",
        *(b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(stream), size, len(name)),
        *(0, 0, 0, 0, 0, 0),
    )
    offset = len(local) + len(name) + len(stream)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name), offset, 0)
    return local + name + stream + central + name + end


def test_a_deflate_bomb_inflates_only_to_its_declared_size() -> None:
    """The stream inflates to 256 MiB, the directory declares the small .npy in front of it
    (with its CRC): reading stops at the declared size instead of inflating everything."""
    x = np.random.default_rng(0).normal(size=(3, 12))
    buf = io.BytesIO()
    np.save(buf, x)
    payload = buf.getvalue()
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 24)
    stream = squeeze.compress(payload) + b"".join(squeeze.compress(zeros) for _ in range(16))
    stream += squeeze.flush()
    assert len(stream) < 512 * 1024  # a small upload
    body = single_member_zip(b"inputs.npy", stream, len(payload), zlib.crc32(payload), 8)
    tracemalloc.start()
    try:
        got, labels = read_npz_body(body, [12], max_inputs=100, max_bytes=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, x)
    assert labels is None
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB while reading a 256 MiB bomb"


def _as_npz(npy: bytes) -> bytes:
    return single_member_zip(b"inputs.npy", npy, len(npy), zlib.crc32(npy), 0)


@pytest.mark.parametrize("fortran", [False, True])
@pytest.mark.parametrize(
    ("header", "data", "code", "reason"),
    [
        ({"descr": "<f8", "shape": (True, 2)}, bytes(16), "invalid-npy", "shape (True, 2)"),
        ({"descr": "<f8", "shape": (-1, 2)}, bytes(16), "invalid-npy", "shape (-1, 2)"),
        ({"descr": "<f16", "shape": (1, 2)}, bytes(32), "invalid-input", "<= 64 bits"),
    ],
    ids=["bool-dimension", "negative-dimension", "long-double"],
)
def test_bad_npy_headers_are_problems_on_every_path(
    client, model, fortran: bool, header: dict[str, Any], data: bytes, code: str, reason: str
) -> None:
    npy = npy_with_header({**header, "fortran_order": fortran}, data)
    for body, headers in ((npy, NPY), (_as_npz(npy), NPZ)):
        r = client.post(f"/v1/models/{model[0]}/certify", content=body, headers=headers)
        assert reason in assert_problem(r, 422, code)["detail"]
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_format_version_is_read_and_no_other(client, model, version) -> None:
    x = np.random.default_rng(1).standard_normal((3, 2))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x, version=version)
    path = f"/v1/models/{model[0]}/certify"
    npy = buf.getvalue()
    future = npy.replace(b"\x93NUMPY" + bytes([version[0]]), b"\x93NUMPY\x09", 1)
    expect = client.post(path, json={"inputs": x.tolist()}).json()["results"]
    for wrap, headers in ((bytes, NPY), (_as_npz, NPZ)):
        r = client.post(path, content=wrap(npy), headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["results"] == expect
        r = client.post(path, content=wrap(future), headers=headers)
        assert "format version 9.0" in assert_problem(r, 422, "invalid-npy")["detail"]


def _call(app: Any, path: str, headers: dict[str, str], messages: list[dict[str, Any]]) -> list:
    """Run one request through ``app`` at the ASGI level: ``messages`` are what the client
    sends (then nothing more arrives); returns what the app sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(http_scope(path, headers), receive, send), 30))
    return sent


def test_a_body_that_stops_arriving_gets_408(make_client, rw_onnx) -> None:
    client = make_client(body_timeout_s=0.3)
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    part = {"type": "http.request", "body": b"\x93NUMPY\x01\x00", "more_body": True}
    sent = _call(client.app, f"/v1/models/{mid}/certify", NPY, [part])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b'"request-timeout"' in sent[1]["body"]
    # raised inside the route (it was reading the body): the rest of the body is never read,
    # so the answer closes the connection, as the guard's own 408 does
    assert (b"connection", b"close") in sent[0]["headers"]


def test_the_body_timeout_does_not_time_the_rest_of_the_request() -> None:
    """After the last body part, an app waiting on receive() (a streaming response listening
    for the disconnect) is not cut off by the body timeout."""
    done: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        assert (await receive())["type"] == "http.disconnect"  # arrives after 3 timeouts
        done.append(body)

    async def run() -> None:
        parts = [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"c", "more_body": False},
        ]

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop(0)
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            pass

        await BodyLimitMiddleware(app, max_bytes=100, timeout_s=0.1)(
            http_scope("/", {}), receive, send
        )

    asyncio.run(run())
    assert done == [b"abc"]


def test_a_client_leaving_mid_upload_is_499_not_a_server_error(
    client, model, caplog: pytest.LogCaptureFixture
) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((4096, 2)))
    body = buf.getvalue()
    messages = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.disconnect"},
    ]
    with caplog.at_level(logging.INFO):
        sent = _call(client.app, f"/v1/models/{model[0]}/certify", NPY, messages)
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert client.get("/v2/health/ready").status_code == 200


def test_an_npz_member_compressed_beyond_any_real_input_is_refused() -> None:
    """3.2 MB of uint8 zeros deflate to a few KB: under the upload cap, but 25 MB once cast to
    float64, from a tiny body. Refused by its compression ratio; the same array stored passes."""
    from service.errors import InvalidInput

    x = np.zeros((4096, 784), dtype=np.uint8)
    packed, stored = io.BytesIO(), io.BytesIO()
    np.savez_compressed(packed, inputs=x)
    np.savez(stored, inputs=x)
    assert len(packed.getvalue()) < 64 * 1024
    with pytest.raises(InvalidInput, match="compression ratio over 64"):
        read_npz_body(packed.getvalue(), [784], max_inputs=10_000, max_bytes=64 << 20)
    got, _ = read_npz_body(stored.getvalue(), [784], max_inputs=10_000, max_bytes=64 << 20)
    assert got.shape == (4096, 784) and not got.any()
    small = io.BytesIO()  # a small, highly compressible body stays within the slack
    np.savez_compressed(small, inputs=np.zeros((10, 784)), labels=np.zeros(10, dtype=np.int64))
    assert read_npz_body(small.getvalue(), [784], max_inputs=100, max_bytes=64 << 20)[1] == [0] * 10


def test_large_bodies_beyond_the_shared_budget_get_503() -> None:
    """A declared 300 KB body reserves its length when admitted, before it arrives; a second
    one does not fit a 0.4 MB budget beside it: 503 service-busy with Retry-After (no wait
    allowed here), never seen by the app. Small bodies are not counted;
    once the first request ends, its bytes are free again. A lone body larger than the budget
    (up to the size cap) still gets in."""
    import json

    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen.append(size)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = BodyLimitMiddleware(app, max_bytes=2 << 20, timeout_s=5.0, budget_bytes=400_000)

    async def request(size: int, gate: asyncio.Event | None = None) -> list[dict[str, Any]]:
        return await post_in_halves(guarded, "/", bytes(size), "application/x-npy", gate)

    async def run() -> None:
        gate = asyncio.Event()
        first = asyncio.create_task(request(300_000, gate))
        await asyncio.sleep(0.05)  # the first body is half received, all of it reserved
        assert guarded.budget is not None and guarded.budget.used == 300_000
        busy = await request(300_000)  # declared: cannot fit, refused before it is read
        assert busy[0]["status"] == 503
        assert (b"retry-after", b"1") in busy[0]["headers"]
        assert json.loads(busy[1]["body"])["code"] == "service-busy"
        small = await request(10_000)  # under 64 KiB: not counted
        assert small[0]["status"] == 200
        gate.set()
        assert (await first)[0]["status"] == 200
        again = await request(300_000)  # the first one's bytes were released
        assert again[0]["status"] == 200
        alone = await request(1_500_000)  # over the budget, under the cap, nothing else in
        assert alone[0]["status"] == 200
        assert guarded.budget is not None and guarded.budget.used == 0

    asyncio.run(run())
    assert seen == [10_000, 300_000, 300_000, 1_500_000]
