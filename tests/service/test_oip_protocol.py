"""The Open Inference Protocol's own shapes, in process: server metadata, ``{"error": ...}``
bodies on every /v2 path (the app's handlers and the body middleware alike) while /v1 keeps
problem+json, the 405 ``Allow`` header, and the binary tensor data extension byte for byte
(little-endian, whatever the host). The stock clients are driven in tests/e2e/test_oip_client.py.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from service.app import create_app
from service.bodies.limits import BodyLimitMiddleware
from service.documents import StoredBound
from service.settings import Settings
from tests.service.asgi_calls import post_in_halves
from tests.service.onnx_nets import assert_oip_error, assert_problem, mlp_onnx

HEADER = "Inference-Header-Content-Length"


def test_server_metadata_and_the_error_shape_of_each_prefix(client) -> None:
    meta = client.get("/v2").json()
    assert meta == {
        "name": "lipcert",
        "version": client.app.version,
        "extensions": meta["extensions"],
    }
    assert "binary_tensor_data" in meta["extensions"]
    assert_oip_error(client.get("/v2/nothing/here"), 404, "no route")
    assert_problem(client.get("/v1/nothing/here"), 404, "not-found")
    # 405 names every method of the path (Starlette's own named only the first route's)
    r = client.patch("/v1/models")
    assert_problem(r, 405, "method-not-allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    r = client.put("/v2/models/abc/infer")
    assert_oip_error(r, 405, "PUT")
    assert r.headers["allow"] == "POST"


def test_versioned_paths_answer_for_version_1_only(client, model) -> None:
    mid, _ = model
    assert client.get(f"/v2/models/{mid}/versions/1").json()["versions"] == ["1"]
    assert client.get(f"/v2/models/{mid}/versions/1/ready").json() == {
        "name": mid,
        "ready": True,
    }
    assert_oip_error(client.get(f"/v2/models/{mid}/versions/2"), 404, "no version '2'")
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [0.5, -1.0]}
    r = client.post(f"/v2/models/{mid}/versions/2/infer", json={"inputs": [tensor]})
    assert_oip_error(r, 404, "no version")
    ok = client.post(f"/v2/models/{mid}/versions/1/infer", json={"inputs": [tensor]})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"


def _split(resp: Any) -> tuple[dict[str, Any], bytes]:
    n = int(resp.headers[HEADER])
    return json.loads(resp.content[:n]), resp.content[n:]


def test_binary_tensors_are_little_endian_both_ways(client, model) -> None:
    mid, _ = model
    x = np.random.default_rng(7).normal(size=(3, 2))
    as_json = client.post(
        f"/v2/models/{mid}/infer",
        json={
            "inputs": [
                {"name": "x", "shape": [3, 2], "datatype": "FP64", "data": x.ravel().tolist()}
            ]
        },
    )
    assert as_json.status_code == 200 and HEADER not in as_json.headers
    want = {o["name"]: o["data"] for o in as_json.json()["outputs"]}

    raw = x.astype("<f8").tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [3, 2],
                    "datatype": "FP64",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "prediction", "parameters": {"binary_data": True}},
                {"name": "certified_radius", "parameters": {"binary_data": False}},
                {"name": "logits"},
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    r = client.post(f"/v2/models/{mid}/infer", content=head + raw, headers={HEADER: str(len(head))})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header, blob = _split(r)
    outs = header["outputs"]
    assert [o["name"] for o in outs] == ["prediction", "certified_radius", "logits"]
    # prediction (binary, INT64) then logits (binary by binary_data_output, FP64); radius JSON
    assert outs[0]["parameters"] == {"binary_data_size": 24} and "data" not in outs[0]
    assert outs[1]["data"] == want["certified_radius"]
    assert outs[2]["parameters"] == {"binary_data_size": 48} and outs[2]["shape"] == [3, 2]
    assert len(blob) == 72
    assert np.frombuffer(blob[:24], "<i8").tolist() == want["prediction"]
    assert np.frombuffer(blob[24:], "<f8").tolist() == want["logits"]


def test_refused_binary_requests(client, model) -> None:
    mid, _ = model
    path = f"/v2/models/{mid}/infer"
    x = np.zeros((1, 2), "<f4")

    def head(**params: Any) -> bytes:
        tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": params}
        return orjson.dumps({"inputs": [tensor]})

    h = head(binary_data_size=8)
    both = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2],
                    "datatype": "FP32",
                    "data": [0, 0],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    )
    for body, length, words in [
        (h + x.tobytes(), "abc", "non-negative integer"),
        (both + x.tobytes(), str(len(both)), "both data and binary_data_size"),
        (head(binary_data_size=-8) + x.tobytes(), None, "non-negative integer"),
        (head(binary_data_size="8") + x.tobytes(), None, "non-negative integer"),
        (head(shared_memory_region="r") + x.tobytes(), None, "shared-memory"),
    ]:
        n = length or str(len(body) - 8)
        assert_oip_error(client.post(path, content=body, headers={HEADER: n}), 400, words)
    nan = np.array([[np.nan, 0]], "<f4").tobytes()
    assert_oip_error(client.post(path, content=h + nan, headers={HEADER: str(len(h))}), 400, "NaN")
    bad_flag = {
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}],
        "parameters": {"binary_data_output": "yes"},
    }
    assert_oip_error(client.post(path, json=bad_flag), 400, "binary_data_output")
    assert_oip_error(client.post(path, content=b"{not json"), 400, "not valid JSON")


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_the_body_middleware_answers_v2_in_the_protocols_shape() -> None:
    """413, 401 and the budget's 503 come from the middleware before any route runs: under
    /v2 they are ``{"error": ...}`` too (with their headers), under /v1 problem+json."""
    guarded = BodyLimitMiddleware(_answer, max_bytes=200_000, budget_bytes=300_000, api_key="k")
    key = {"x-api-key": "k"}

    async def post(path: str, size: int, headers: dict[str, str], gate: Any = None) -> Any:
        hdrs = {"content-length": str(size), **headers}
        return await post_in_halves(guarded, path, bytes(size), "", gate, headers=hdrs)

    def error(sent: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
        start = sent[0]
        return start["status"], json.loads(sent[1]["body"]), dict(start["headers"])

    async def run() -> None:
        status, body, headers = error(await post("/v2/models/m/infer", 300_000, key))
        assert status == 413 and set(body) == {"error"} and "exceeds" in body["error"]
        assert headers[b"content-type"] == b"application/json"
        status, body, _ = error(await post("/v1/models/m/certify", 300_000, key))
        assert status == 413 and body["code"] == "payload-too-large"
        status, body, headers = error(await post("/v2/models/m/infer", 10, {}))
        assert status == 401 and set(body) == {"error"} and headers[b"www-authenticate"]
        # a binary-tensor body is counted as bytes: 150 KB held + 100 KB fits 300 KB ...
        gate = asyncio.Event()
        held = asyncio.create_task(
            post("/v2/models/m/infer", 300_000 // 2, {**key, HEADER: "2"}, gate)
        )
        await asyncio.sleep(0.05)
        binary = {**key, HEADER: "10"}
        assert (await post("/v2/models/m/infer", 100_000, binary))[0]["status"] == 200
        # ... a JSON one (no header, no content type: read as JSON) counts 16x and gets 503
        status, body, headers = error(await post("/v2/models/m/infer", 100_000, key))
        assert status == 503 and set(body) == {"error"} and headers[b"retry-after"] == b"1"
        gate.set()
        assert (await held)[0]["status"] == 200

    asyncio.run(run())


def test_the_json_part_of_a_binary_body_is_counted_at_the_json_weight(
    tmp_path: Path, rw_weights: list[np.ndarray]
) -> None:
    """The middleware counts a binary-tensor body as bytes; before decoding, the route counts
    its JSON part at JSON_DECODE_FACTOR: with 100 KB of another body held and a 512 KB budget,
    80 KB with a 30 KB JSON part (80 + 16 x 30 KB) is answered 503 {"error"} + Retry-After."""
    app = create_app(Settings(data_dir=tmp_path, device="cpu", body_budget_mb=0.5))
    n0 = rw_weights[0].shape[1]
    npy = io.BytesIO()
    np.save(npy, np.ones((200_000 // (8 * n0), n0)))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                up = await http.post("/v1/models", files={"file": ("m.onnx", mlp_onnx(rw_weights))})
                mid = up.json()["id"]
                app.state.storage.save_bound(
                    mid,
                    StoredBound.from_json(
                        {"lipschitz_bound": 1.0, "method": "naive", "verified": True}
                    ),
                )
                gate = asyncio.Event()
                held = asyncio.create_task(
                    post_in_halves(
                        app, f"/v1/models/{mid}/certify", npy.getvalue(), "application/x-npy", gate
                    )
                )
                await asyncio.sleep(0.1)
                body = b" " * 30_000 + bytes(50_000)
                r = await http.post(
                    f"/v2/models/{mid}/infer", content=body, headers={HEADER: "30000"}
                )
                assert_oip_error(r, 503, "retry")
                assert r.headers["retry-after"] == "1"
                gate.set()
                assert (await held)[0]["status"] == 200

    asyncio.run(run())
