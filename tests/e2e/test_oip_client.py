"""Stock Open Inference Protocol clients against a real ``lipcert serve`` (uvicorn) process.

Triton's ``tritonclient[http]`` and KServe's ``InferenceRESTClient``, unmodified, drive the whole
v2 flow: server and model metadata, readiness (not ready until a verified bound exists), infer
with JSON and binary tensors (FP32/FP64, batches, a single unbatched input, requested outputs
in JSON or binary), and errors, which the clients must surface with the server's own message
(``{"error": ...}`` bodies). Logits are checked against onnxruntime, radii against
margin / (sqrt(2) L) from those logits; the binary and JSON answers must agree bit for bit.
The server runs with an API key, as in production.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as tc
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from tritonclient.utils import InferenceServerException

from tests.e2e.test_server import Server
from tests.service.onnx_nets import mlp_onnx

pytestmark = pytest.mark.e2e

KEY = "oip-test-key"


def auth() -> dict[str, str]:
    """A fresh headers dict per call: tritonclient adds its own headers to the one it is given."""
    return {"X-API-Key": KEY}


N0, HIDDEN, K = 12, 16, 4


def _net() -> tuple[bytes, list[np.ndarray]]:
    rng = np.random.default_rng(14)
    ws = [rng.normal(size=(HIDDEN, N0)) / 3, rng.normal(size=(K, HIDDEN)) / 4]
    return mlp_onnx(ws), ws


def _ort_logits(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0].astype(np.float64)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, bytes]]:
    """A server with an API key and one uploaded model (no bound yet): (server, id, onnx)."""
    tmp = tmp_path_factory.mktemp("oip")
    srv = Server(tmp / "data", tmp / "server.log", env={"LIPCERT_API_KEY": KEY})
    srv.start()
    try:
        onnx_bytes, _ = _net()
        up = httpx.post(
            srv.url + "/v1/models", files={"file": ("mlp.onnx", onnx_bytes)}, headers=auth()
        )
        assert up.status_code == 201, up.text
        yield srv, up.json()["id"], onnx_bytes
    finally:
        srv.stop()


def _bound(srv: Server, mid: str) -> float:
    """Run a naive bound job and wait for it; its Lipschitz bound."""
    with httpx.Client(base_url=srv.url, headers=auth(), timeout=60) as c:
        r = c.post(f"/v1/models/{mid}/bounds", json={"method": "naive"})
        assert r.status_code == 202, r.text
        for _ in range(600):
            job = c.get(f"/v1/jobs/{r.json()['id']}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        return float(job["result"]["lipschitz_bound"])


def _client(srv: Server) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(url=srv.url.removeprefix("http://"), network_timeout=60)


def _input(x: np.ndarray, datatype: str, binary: bool) -> tc.InferInput:
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def _expected(onnx_bytes: bytes, x: np.ndarray, lip: float) -> tuple[np.ndarray, np.ndarray]:
    ref = _ort_logits(onnx_bytes, x.reshape(-1, N0))
    top2 = np.sort(ref, axis=1)[:, -2:]
    return ref, (top2[:, 1] - top2[:, 0]) / (math.sqrt(2) * lip)


def test_tritonclient_runs_the_whole_v2_flow(served: tuple[Server, str, bytes]) -> None:
    srv, mid, onnx_bytes = served
    client = _client(srv)
    try:
        assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
        meta = client.get_server_metadata(headers=auth())
        assert meta["name"] == "lipcert" and "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata(mid, headers=auth())
        assert model["inputs"][0]["shape"] == [-1, N0] and model["versions"] == ["1"]
        assert [o["name"] for o in model["outputs"]] == ["logits", "prediction", "certified_radius"]
        assert client.get_model_metadata(mid, model_version="1", headers=auth())["name"] == mid

        x = np.random.default_rng(0).normal(size=(9, N0)).astype(np.float32)
        # no verified bound yet: not ready, and infer says why
        assert client.is_model_ready(mid, headers=auth()) is False
        with pytest.raises(InferenceServerException) as exc:
            client.infer(mid, [_input(x, "FP32", True)], headers=auth())
        assert exc.value.status() == "409" and "no verified Lipschitz bound" in exc.value.message()

        lip = _bound(srv, mid)
        assert client.is_model_ready(mid, headers=auth()) is True
        assert client.is_model_ready(mid, model_version="1", headers=auth()) is True
        ref, radius = _expected(onnx_bytes, x, lip)

        # binary FP32 input, no outputs named: every output comes back binary
        res = client.infer(mid, [_input(x, "FP32", True)], request_id="b1", headers=auth())
        assert res.get_response()["id"] == "b1"
        assert all("data" not in o for o in res.get_response()["outputs"])
        logits = res.as_numpy("logits")
        assert logits.dtype == np.float64 and logits.shape == (9, K)
        np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res.as_numpy("prediction"), np.argmax(ref, axis=1))
        np.testing.assert_allclose(res.as_numpy("certified_radius"), radius, rtol=1e-4, atol=1e-7)
        assert res.get_response()["parameters"]["lipschitz_bound"] == pytest.approx(lip)

        # JSON input, outputs asked for in JSON: the same numbers, bit for bit
        asked = [tc.InferRequestedOutput(n, binary_data=False) for n in ("logits", "prediction")]
        js = client.infer(mid, [_input(x, "FP32", False)], outputs=asked, headers=auth())
        assert [o["name"] for o in js.get_response()["outputs"]] == ["logits", "prediction"]
        assert all("data" in o for o in js.get_response()["outputs"])
        np.testing.assert_array_equal(js.as_numpy("logits"), logits)
        np.testing.assert_array_equal(js.as_numpy("prediction"), res.as_numpy("prediction"))
        assert js.as_numpy("certified_radius") is None

        # FP64, binary, one output in binary and one in JSON, through the versioned path
        x64 = np.random.default_rng(1).normal(size=(5, N0))
        mixed = [
            tc.InferRequestedOutput("certified_radius", binary_data=True),
            tc.InferRequestedOutput("logits", binary_data=False),
        ]
        r64 = client.infer(
            mid, [_input(x64, "FP64", True)], outputs=mixed, model_version="1", headers=auth()
        )
        ref64, radius64 = _expected(onnx_bytes, x64, lip)
        np.testing.assert_allclose(r64.as_numpy("logits"), ref64, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r64.as_numpy("certified_radius"), radius64, rtol=1e-4, atol=1e-6)
        # FP64 inputs are not rounded to FP32 on the way: JSON and binary FP64 agree exactly
        j64 = client.infer(mid, [_input(x64, "FP64", False)], outputs=mixed, headers=auth())
        np.testing.assert_array_equal(j64.as_numpy("logits"), r64.as_numpy("logits"))

        # one input without a batch dimension: shape [n0]
        one = client.infer(mid, [_input(x[0], "FP32", True)], headers=auth())
        np.testing.assert_array_equal(one.as_numpy("logits"), logits[:1])
    finally:
        client.close()


def _raises(call, status: str, *words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as exc:
        call()
    assert exc.value.status() == status, exc.value
    for word in words:
        assert word in exc.value.message(), exc.value.message()


def test_tritonclient_reports_the_servers_errors(served: tuple[Server, str, bytes]) -> None:
    srv, mid, _ = served
    client = _client(srv)
    x = np.zeros((2, N0), np.float32)
    try:
        _raises(lambda: client.get_model_metadata("0" * 16, headers=auth()), "404", "no model")
        _raises(lambda: client.infer("0" * 16, [_input(x, "FP32", True)], headers=auth()), "404")
        _raises(lambda: client.get_model_metadata(mid, model_version="2", headers=auth()), "404")
        _raises(lambda: client.get_model_metadata(mid), "401", "X-API-Key")
        _raises(
            lambda: client.infer(mid, [_input(x, "FP32", True)], headers={"X-API-Key": "wrong"}),
            "401",
            "X-API-Key",
        )
        wrong = np.zeros((2, N0 + 1), np.float32)
        _raises(
            lambda: client.infer(mid, [_input(wrong, "FP32", True)], headers=auth()),
            "400",
            "expected [batch, 12]",
        )
        nan = x.copy()
        nan[1, 3] = np.nan
        _raises(
            lambda: client.infer(mid, [_input(nan, "FP32", True)], headers=auth()),
            "400",
            "NaN",
        )
        unknown = [tc.InferRequestedOutput("probabilities")]
        _raises(
            lambda: client.infer(mid, [_input(x, "FP32", True)], outputs=unknown, headers=auth()),
            "400",
            "unknown outputs",
        )
        text = tc.InferInput("input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"x"], dtype=object))
        _raises(lambda: client.infer(mid, [text], headers=auth()), "400", "datatype")
        # over the server's 0.5 MB body cap (LIPCERT_MAX_UPLOAD_MB in Server)
        big = np.zeros((12000, N0), np.float32)
        _raises(
            lambda: client.infer(mid, [_input(big, "FP32", True)], headers=auth()),
            "413",
            "exceeds the limit",
        )
        assert srv.alive()
    finally:
        client.close()


def _post(srv: Server, mid: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v2/models/{mid}/infer", content=body, headers={**auth(), **headers}, timeout=60
    )


def test_malformed_binary_bodies_get_400_with_the_reason(served: tuple[Server, str, bytes]) -> None:
    """What a stock client never sends: header lengths and sizes that do not add up."""
    srv, mid, _ = served
    x = np.arange(2 * N0, dtype="<f4").reshape(2, N0)
    tensor = {"name": "input", "shape": [2, N0], "datatype": "FP32"}

    def body(size: int, extra: bytes = b"") -> tuple[bytes, int]:
        head = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": size}}]})
        return head + x.tobytes() + extra, len(head)

    # (body, JSON length, header sent instead of the right one, words of the message)
    cases = [
        (*body(x.nbytes), "99999", "Inference-Header-Content-Length"),
        (*body(x.nbytes), "-3", "Inference-Header-Content-Length"),
        (*body(x.nbytes - 4), None, "takes 96 bytes"),
        (*body(x.nbytes, b"\x00" * 8), None, "bytes after the inputs"),
        (*body(2 * x.nbytes), None, "takes 96 bytes"),
    ]
    for content, head_len, header, words in cases:
        r = _post(srv, mid, content, {"Inference-Header-Content-Length": header or str(head_len)})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"error"} and words in r.json()["error"], r.json()
    # a body that ends inside the tensor bytes
    content, head_len = body(x.nbytes)
    r = _post(srv, mid, content[:-5], {"Inference-Header-Content-Length": str(head_len)})
    assert r.status_code == 400 and "short" in r.json()["error"]
    # binary_data_size without the header
    r = _post(srv, mid, content, {})
    assert r.status_code == 400 and "error" in r.json()
    # a compressed body is refused, not misread
    r = _post(srv, mid, content, {"Content-Encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
    # a well-formed one works, whatever the Content-Type says
    r = _post(
        srv,
        mid,
        content,
        {"Inference-Header-Content-Length": str(head_len), "Content-Type": "text/plain"},
    )
    assert r.status_code in (200, 409), r.text
    assert srv.alive()


def test_kserve_rest_client_runs_the_v2_flow(served: tuple[Server, str, bytes]) -> None:
    srv, mid, onnx_bytes = served
    lip = _bound(srv, mid)
    x = np.random.default_rng(3).normal(size=(6, N0)).astype(np.float32)
    ref, radius = _expected(onnx_bytes, x, lip)

    async def run() -> None:
        config = RESTConfig(protocol="v2", timeout=60)
        async with InferenceRESTClient(config=config) as client:
            assert await client.is_server_live(srv.url, headers=auth())
            assert await client.is_server_ready(srv.url, headers=auth())
            assert await client.is_model_ready(srv.url, mid, headers=auth())
            for binary in (False, True):
                inp = InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                outputs = [RequestedOutput("logits", {"binary_data": binary})]
                outputs.append(RequestedOutput("certified_radius"))
                req = InferRequest(mid, [inp], request_outputs=outputs)
                res = await client.infer(srv.url, req, model_name=mid, headers=auth())
                got = {o.name: o.as_numpy() for o in res.outputs}
                assert set(got) == {"logits", "certified_radius"}
                np.testing.assert_allclose(got["logits"].reshape(6, K), ref, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got["certified_radius"], radius, rtol=1e-4, atol=1e-7)
            bad = InferInput("input", [1, N0 + 1], "FP32")
            bad.set_data_from_numpy(np.zeros((1, N0 + 1), np.float32), binary_data=False)
            with pytest.raises(httpx.HTTPStatusError) as exc:
                await client.infer(
                    srv.url, InferRequest(mid, [bad]), model_name=mid, headers=auth()
                )
            assert exc.value.response.status_code == 400
            assert "expected [batch, 12]" in str(exc.value)

    asyncio.run(run())
