"""Certify and OIP infer over HTTP: radii are margin / (sqrt(2) L) of onnxruntime's logits,
bad inputs give 4xx problem+json, and concurrent requests are micro-batched correctly."""

from __future__ import annotations

import asyncio
import io
import math

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service import metrics
from service.app import create_app
from service.documents import StoredBound
from service.settings import Settings
from tests.service.onnx_nets import assert_oip_error, assert_problem, mlp_onnx


def _ort_logits(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0].astype(np.float64)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_no_bound_is_409_with_hint(client, rw_onnx) -> None:
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    body = assert_problem(
        client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0.1, 0.2]]}),
        409,
        "no-verified-bound",
    )
    assert f"/v1/models/{mid}/bounds" in body["hint"]
    ready = client.get(f"/v2/models/{mid}/ready")  # OIP: a 4xx status means not ready
    assert ready.status_code == 409 and ready.json()["ready"] is False
    assert "no verified Lipschitz bound" in ready.json()["error"]
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [0.1, 0.2]}
    infer = client.post(f"/v2/models/{mid}/infer", json={"inputs": [tensor]})
    assert_oip_error(infer, 409, "no verified Lipschitz bound")


def test_radii_match_onnxruntime_logits(client, model, rw_onnx) -> None:
    mid, lip = model
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2))
    r = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist(), "return_logits": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lipschitz_bound"] == pytest.approx(lip, rel=1e-12)
    assert body["method"] == "naive" and body["precision"] == "float64"
    ref = _ort_logits(rw_onnx, x)
    top2 = np.sort(ref, axis=1)[:, -2:]
    want_margin = top2[:, 1] - top2[:, 0]
    got = body["results"]
    assert len(got) == 32
    for i, item in enumerate(got):
        assert item["prediction"] == int(np.argmax(ref[i]))
        np.testing.assert_allclose(item["logits"], ref[i], rtol=1e-5, atol=1e-4)
        assert item["margin"] == pytest.approx(want_margin[i], rel=1e-4, abs=1e-4)
        assert item["radius"] == pytest.approx(item["margin"] / (math.sqrt(2) * lip), rel=1e-12)


def test_certified_radius_is_empirically_safe(client, model, rw_weights) -> None:
    """Points just inside the radius keep the class (random directions)."""
    mid, _ = model
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 2))
    res = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()["results"]
    ws = [w.astype(np.float32).astype(np.float64) for w in rw_weights]

    def f(z: np.ndarray) -> np.ndarray:
        for w in ws[:-1]:
            z = np.maximum(z @ w.T, 0)
        return z @ ws[-1].T

    for xi, item in zip(x, res, strict=True):
        d = rng.normal(size=(200, 2))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        pts = xi + 0.999 * item["radius"] * d
        assert (np.argmax(f(pts), axis=1) == item["prediction"]).all()


def test_npy_body_matches_json(client, model) -> None:
    mid, _ = model
    x = np.random.default_rng(2).normal(size=(5, 2))
    js = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()
    npy = client.post(
        f"/v1/models/{mid}/certify",
        content=_npy(x),
        headers={"content-type": "application/x-npy"},
    ).json()
    assert npy["results"] == js["results"]
    for variant in (np.asfortranarray(x), x.astype(">f8")):  # column-major, big-endian
        again = client.post(
            f"/v1/models/{mid}/certify",
            content=_npy(variant),
            headers={"content-type": "application/x-npy"},
        ).json()
        assert again["results"] == js["results"]
    # shaped like the model input (here (2,)) or float32: both accepted
    f32 = client.post(
        f"/v1/models/{mid}/certify?return_logits=true",
        content=_npy(x.astype(np.float32)),
        headers={"content-type": "application/x-npy"},
    )
    assert f32.status_code == 200 and "logits" in f32.json()["results"][0]


def test_labels_certified_accuracy_and_bound_by_job(client, model) -> None:
    mid, _lip = model
    x = np.random.default_rng(3).normal(size=(10, 2))
    first = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()
    preds = [r["prediction"] for r in first["results"]]
    labels = [p if i % 2 == 0 else 1 - p for i, p in enumerate(preds)]
    eps = float(np.median([r["radius"] for r in first["results"]]))
    body = client.post(
        f"/v1/models/{mid}/certify",
        json={"inputs": x.tolist(), "labels": labels, "bound": "job-naive", "epsilon": eps},
    ).json()
    want = [labels[i] == preds[i] and first["results"][i]["radius"] > eps for i in range(10)]
    assert [r["certified"] for r in body["results"]] == want
    assert [r["correct"] for r in body["results"]] == [labels[i] == preds[i] for i in range(10)]
    assert body["certified_accuracy"] == pytest.approx(sum(want) / 10)
    assert body["accuracy"] == pytest.approx(0.5)
    assert body["bound_job_id"] == "job-naive"
    assert_problem(
        client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist(), "bound": "nope"}),
        404,
        "bound-not-found",
    )


def test_best_bound_is_the_smallest_verified(client, model) -> None:
    mid, lip = model
    storage = client.app.state.storage
    storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": lip / 100, "method": "x", "verified": False})
    )
    storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip / 2, "method": "lipsdp-neuron", "verified": True}
        ),
    )
    body = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0.3, 0.1]]}).json()
    assert body["lipschitz_bound"] == pytest.approx(lip / 2)
    assert body["method"] == "lipsdp-neuron"


def test_pairwise_radius(client, model) -> None:
    mid, lip = model
    pw = [[0.0, lip / 3], [lip / 3, 0.0]]
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {
                "lipschitz_bound": lip / 1.01,
                "method": "lipsdp-neuron",
                "verified": True,
                "pairwise": pw,
            }
        ),
    )
    item = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0.3, -0.7]]}).json()[
        "results"
    ][0]
    # two classes: f_y - f_j is the margin, so the pairwise radius is margin / L_yj
    assert item["radius_pairwise"] == pytest.approx(item["margin"] / (lip / 3), rel=1e-12)


@pytest.mark.parametrize(
    ("content", "ctype", "status", "code"),
    [
        (b'{"inputs": [[1, 2]', "application/json", 400, "malformed-json"),
        (b'{"inputs": [[NaN, 2]]}', "application/json", 400, "malformed-json"),
        (b'{"inputs": [["nan", 2]]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [["1.5", 2]]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [[true, 2]]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [[1, 2], [3]]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [[1, 2, 3]]}', "application/json", 422, "wrong-input-shape"),
        (b'{"inputs": [1, 2]}', "application/json", 422, "wrong-input-shape"),
        (b'{"inputs": [[1e400, 2]]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": []}', "application/json", 422, "validation-error"),
        (b'{"inputs": [[1, 2]], "labels": [5]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [[1, 2]], "labels": [0, 1]}', "application/json", 422, "invalid-input"),
        (b'{"inputs": [[1, 2]], "labels": ["1"]}', "application/json", 422, "validation-error"),
        (b'{"inputs": [[1, 2]], "labels": [true]}', "application/json", 422, "validation-error"),
        (
            b'{"inputs": [[1, 2]], "return_logits": "yes"}',
            "application/json",
            422,
            "validation-error",
        ),
        (b"[1, 2]", "application/json", 422, "validation-error"),
        (b"\x93NUMPY garbage", "application/x-npy", 422, "invalid-npy"),
        (b"not npy", "application/x-npy", 422, "invalid-npy"),
        (b"a,b", "text/csv", 415, "unsupported-media-type"),
    ],
)
def test_bad_certify_requests(client, model, content, ctype, status, code) -> None:
    mid, _ = model
    r = client.post(f"/v1/models/{mid}/certify", content=content, headers={"content-type": ctype})
    assert_problem(r, status, code)
    assert client.get("/v2/health/ready").status_code == 200


def test_nan_and_bad_npy_inputs(client, model) -> None:
    mid, _ = model
    hdr = {"content-type": "application/x-npy"}
    x = np.zeros((3, 2))
    x[1, 0] = np.nan
    body = assert_problem(
        client.post(f"/v1/models/{mid}/certify", content=_npy(x), headers=hdr), 422
    )
    assert "row 1" in body["detail"]
    x[1, 0] = np.inf
    assert_problem(client.post(f"/v1/models/{mid}/certify", content=_npy(x), headers=hdr), 422)
    for bad in (
        np.zeros((3, 5)),
        np.array(["a", "b"]),
        np.zeros((0, 2)),
        np.zeros(2),
        np.array([1 + 2j, 3j]),
    ):
        assert_problem(
            client.post(f"/v1/models/{mid}/certify", content=_npy(bad), headers=hdr), 422
        )
    truncated = _npy(np.ones((100, 2)))[:-40]
    assert_problem(client.post(f"/v1/models/{mid}/certify", content=truncated, headers=hdr), 422)


def test_too_many_inputs(make_client, rw_onnx) -> None:
    client = make_client(max_inputs=4)
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    client.app.state.storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 1e3, "method": "naive", "verified": True})
    )
    assert_problem(client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0, 0]] * 5}), 422)


def test_unknown_model_is_404(client) -> None:
    assert_problem(
        client.post("/v1/models/ffffffffffffffff/certify", json={"inputs": [[1, 2]]}), 404
    )
    oip = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    assert_oip_error(client.post("/v2/models/ffffffffffffffff/infer", json=oip), 404, "no model")
    assert_oip_error(client.get("/v2/models/ffffffffffffffff"), 404, "no model")
    assert_oip_error(client.get("/v2/models/ffffffffffffffff/ready"), 404, "no model")


def test_oip_v2(client, model, rw_onnx) -> None:
    mid, lip = model
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{mid}").json()
    assert meta["name"] == mid and meta["inputs"][0]["shape"] == [-1, 2]
    assert client.get(f"/v2/models/{mid}/ready").json() == {"name": mid, "ready": True}
    x = np.random.default_rng(4).normal(size=(3, 2)).astype(np.float32)
    req = {
        "id": "r1",
        "inputs": [
            {"name": "input", "shape": [3, 2], "datatype": "FP32", "data": x.ravel().tolist()}
        ],
    }
    r = client.post(f"/v2/models/{mid}/infer", json=req)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1"
    ref = _ort_logits(rw_onnx, x)
    np.testing.assert_allclose(np.reshape(out["logits"]["data"], (3, 2)), ref, rtol=1e-5, atol=1e-4)
    # FP64: the very logits the radius is computed from (as FP32, logits over 3.4e38 were null)
    assert out["logits"]["datatype"] == "FP64" and meta["outputs"][0]["datatype"] == "FP64"
    same = {"inputs": x.astype(np.float64).tolist(), "return_logits": True}
    rows = client.post(f"/v1/models/{mid}/certify", json=same).json()["results"]
    assert out["logits"]["data"] == [v for row in rows for v in row["logits"]]
    assert out["prediction"]["data"] == np.argmax(ref, axis=1).tolist()
    margins = np.abs(ref[:, 0] - ref[:, 1])
    np.testing.assert_allclose(
        out["certified_radius"]["data"], margins / (math.sqrt(2) * lip), rtol=1e-4, atol=1e-6
    )
    only = dict(req, outputs=[{"name": "certified_radius"}])
    assert [
        o["name"] for o in client.post(f"/v2/models/{mid}/infer", json=only).json()["outputs"]
    ] == ["certified_radius"]
    bad = dict(req, inputs=[dict(req["inputs"][0], shape=[4, 2])])
    assert_oip_error(client.post(f"/v2/models/{mid}/infer", json=bad), 400, "shape [4, 2]")
    assert_oip_error(
        client.post(f"/v2/models/{mid}/infer", json=dict(req, outputs=[{"name": "nope"}])),
        400,
        "unknown outputs",
    )
    assert_oip_error(client.post(f"/v2/models/{mid}/infer", json={"inputs": []}), 400, "inputs")
    huge = dict(req, inputs=[dict(req["inputs"][0], data=[1e39] * 6)])
    assert_oip_error(client.post(f"/v2/models/{mid}/infer", json=huge), 400, "overflow FP32")


def _batched_count() -> tuple[float, float]:
    """(forward passes, forward passes with more than one row) so far in this process."""
    total = metrics.REGISTRY.get_sample_value("lipcert_inference_batch_size_count") or 0.0
    ones = (
        metrics.REGISTRY.get_sample_value("lipcert_inference_batch_size_bucket", {"le": "1.0"})
        or 0.0
    )
    return total, total - ones


def test_200_concurrent_requests_are_batched_and_correct(tmp_path, rw_onnx, rw_weights) -> None:
    app = create_app(Settings(data_dir=tmp_path, device="cpu", max_wait_ms=5.0))
    ws = [w.astype(np.float32).astype(np.float64) for w in rw_weights]
    x = np.random.default_rng(5).normal(size=(200, 2))

    def f(z: np.ndarray) -> np.ndarray:
        for w in ws[:-1]:
            z = np.maximum(z @ w.T, 0)
        return z @ ws[-1].T

    async def run() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                up = await c.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)})
                mid = up.json()["id"]
                app.state.storage.save_bound(
                    mid,
                    StoredBound.from_json(
                        {"lipschitz_bound": 1e3, "method": "naive", "verified": True}
                    ),
                )
                before = _batched_count()
                resps = await asyncio.gather(
                    *[
                        c.post(
                            f"/v1/models/{mid}/certify",
                            json={"inputs": [x[i].tolist()], "return_logits": True},
                        )
                        for i in range(200)
                    ]
                )
                after = _batched_count()
                text = (await c.get("/metrics")).text
        assert after[1] > before[1], "no forward pass merged more than one request"
        assert after[0] - before[0] < 200
        assert "lipcert_inference_batch_size_bucket" in text
        return resps

    resps = asyncio.run(run())
    want = f(x)
    for i, r in enumerate(resps):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["results"][0]["logits"], want[i], rtol=1e-12)


def test_full_queue_is_503_with_retry_after(make_client, rw_onnx) -> None:
    client = make_client(queue_size=1)
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    client.app.state.storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 1e3, "method": "naive", "verified": True})
    )
    worker = client.app.state.worker
    worker.stop()  # nothing drains the queue now
    worker._queue.put_nowait(object())  # occupy the single slot
    r = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0, 0]]})
    assert_problem(r, 503, "service-busy")
    assert r.headers["retry-after"] == "1"


def test_single_output_model_is_422_not_500(client) -> None:
    rng = np.random.default_rng(6)
    data = mlp_onnx([rng.normal(size=(3, 2)), rng.normal(size=(1, 3))])
    mid = client.post("/v1/models", files={"file": ("one.onnx", data)}).json()["id"]
    client.app.state.storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 10.0, "method": "naive", "verified": True})
    )
    r = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0.1, 0.2]]})
    assert_problem(r, 422, "not-a-classifier")
