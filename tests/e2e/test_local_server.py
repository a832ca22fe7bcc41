"""Local certification through a real ``lipcert serve`` (uvicorn) process.

Sync ``mode: local`` certify (JSON and .npy), a certification job (202, SSE progress, result as
JSON and .npz), OIP ``parameters.mode = local``, and bad input: 4xx problem+json with a stable
code while the server stays alive. The numbers are checked against onnxruntime's logits and an
attack-free invariant: a radius is never below the global radius of the same bound.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.test_server import Server, _npy, _wait_job
from tests.service.onnx_nets import assert_problem, mlp_onnx
from tests.service.test_api_local import small_net

pytestmark = pytest.mark.e2e

BUDGET_S = 0.5
"""The server's LIPCERT_LOCAL_TIME_BUDGET_S: OIP infer has no time_budget_s, and the default
(5 s per input) made its local call here 30 s of wall clock."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(
        tmp_path / "data", tmp_path / "server.log", {"LIPCERT_LOCAL_TIME_BUDGET_S": str(BUDGET_S)}
    )
    srv.start()
    yield srv
    srv.stop()


def test_local_certification_over_http(server: Server, tmp_path: Path) -> None:
    onnx_bytes = mlp_onnx(small_net(2))
    c = httpx.Client(base_url=server.url, timeout=120)
    mid = c.post("/v1/models", files={"file": ("n.onnx", onnx_bytes)}).json()["id"]
    bound = c.post(f"/v1/models/{mid}/bounds", json={"method": "naive"}).json()
    assert _wait_job(c, bound["job_id"])["status"] == "succeeded"
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    logits = ort.InferenceSession(onnx_bytes).run(None, {"input": x})[0]
    y = logits.argmax(1)

    # sync, JSON: predictions are onnxruntime's, radii never below the global ones
    sync = {"inputs": x.tolist(), "labels": y.tolist(), "mode": "local", "time_budget_s": BUDGET_S}
    r = c.post(f"/v1/models/{mid}/certify", json=sync)
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [row["prediction"] for row in rows] == y.tolist()
    glob = c.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()["results"]
    for row, g in zip(rows, glob, strict=True):
        assert row["radius"] >= row["global_radius"]
        assert math.isclose(row["global_radius"], g["radius"], rel_tol=1e-9, abs_tol=1e-15)

    # sync, .npy with the options as query parameters
    r = c.post(
        f"/v1/models/{mid}/certify?mode=local&epsilon=0.05&method=crown",
        content=_npy(x),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 200 and all("certified" in row for row in r.json()["results"])

    # a job: 202 + Location, SSE progress, the same answers as JSON and as .npz
    r = c.post(
        f"/v1/models/{mid}/certifications",
        json={
            "inputs": x.tolist(),
            "labels": y.tolist(),
            "epsilon": 0.05,
            "method": "crown",
            "chunk_rows": 2,
        },
    )
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    events = c.get(f"/v1/jobs/{r.json()['id']}/events").text
    assert "event: end" in events
    job = _wait_job(c, r.json()["id"])
    assert job["status"] == "succeeded" and job["result"]["chunks"] == 3, job
    got = c.get(f"/v1/jobs/{job['id']}/result").json()
    z = c.get(f"/v1/jobs/{job['id']}/result", headers={"accept": "application/x-npz"})
    with np.load(io.BytesIO(z.content), allow_pickle=False) as arrays:
        assert arrays["certified"].tolist() == [row["certified"] for row in got["results"]]
    assert got["certified_accuracy"] == job["result"]["certified_accuracy"]

    # OIP
    req = {
        "inputs": [
            {"name": "input", "shape": [6, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        "parameters": {"mode": "local"},
    }
    oip = c.post(f"/v2/models/{mid}/infer", json=req)
    assert oip.status_code == 200, oip.text

    # bad input: 4xx problem+json, the server alive after each
    for body, status, code in [
        ({"inputs": x.tolist(), "mode": "local", "epsilon": -1}, 422, "invalid-epsilon"),
        ({"inputs": x.tolist(), "mode": "local", "method": "x"}, 422, "unsupported-method"),
        ({"inputs": [[1.0]], "mode": "local"}, 422, "wrong-input-shape"),
    ]:
        assert_problem(c.post(f"/v1/models/{mid}/certify", json=body), status, code)
        assert_problem(c.post(f"/v1/models/{mid}/certifications", json=body), status, code)
        assert server.alive()
    bad = x.astype(np.float64)
    bad[0, 0] = np.nan
    assert_problem(
        c.post(
            f"/v1/models/{mid}/certify?mode=local",
            content=_npy(bad),
            headers={"content-type": "application/x-npy"},
        ),
        422,
    )
    assert server.alive()
