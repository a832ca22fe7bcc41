"""Certification jobs on the local runner: ``POST /v1/models/{id}/certifications`` -> 202,
progress over SSE, results as JSON or .npz, equal to the library on the same batch; bad
input refused before anything is queued."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.bodies.media import NPZ_MEDIA_TYPE
from service.certification import Certified
from service.documents import StoredBound
from service.local_certify import LocalOptions, certify_rows
from tests.service.jobs_support import ended, job_getter, wait_for
from tests.service.onnx_nets import assert_problem, mlp_onnx, norm_product
from tests.service.test_api_local import small_net


@pytest.fixture
def pooled(make_client: Any) -> TestClient:
    """An app whose local runner certifies each job's chunks on a pool of 2 processes."""
    return make_client(certify_workers=2, certify_chunk_rows=5)


def chunked_reference(
    net: Any, x: np.ndarray, y: Any, options: LocalOptions, bound: Any, chunk: int
) -> Certified:
    """The library on the job's chunks (a forward pass may round differently with another
    batch size: each chunk's numbers are reproduced exactly, not the whole batch's)."""
    parts = [
        certify_rows(net, x[a : a + chunk], None if y is None else y[a : a + chunk], options, bound)
        for a in range(0, len(x), chunk)
    ]
    return Certified(
        {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns}, {}
    )


def _upload(client: TestClient, seed: int = 0) -> tuple[str, float]:
    weights = small_net(seed)
    mid = client.post("/v1/models", files={"file": ("n.onnx", mlp_onnx(weights))}).json()["id"]
    lip = norm_product(weights)
    client.app.state.storage.save_bound(  # type: ignore[attr-defined]
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "j-naive"}
        ),
    )
    return str(mid), lip


def _submit(client: TestClient, mid: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/models/{mid}/certifications", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "certification"
    return dict(job)


def test_job_in_chunks_on_a_process_pool_equals_the_library(pooled: TestClient) -> None:
    mid, lip = _upload(pooled)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(23, 4))
    net = pooled.app.state.storage.load_network(mid)  # type: ignore[attr-defined]
    y = np.argmax(net.forward(x), axis=1)
    y[::7] = (y[::7] + 1) % 3
    job = _submit(pooled, mid, inputs=x.tolist(), labels=y.tolist(), epsilon=0.1, method="crown")
    events = pooled.get(f"/v1/jobs/{job['id']}/events").text  # streams until the job ends
    done = wait_for(job_getter(pooled, job["id"]), ended, timeout_s=240)
    assert done["status"] == "succeeded", done
    res = done["result"]
    assert res["inputs"] == 23 and res["chunks"] == 5 and res["mode"] == "local"
    assert "event: progress" in events and '"phase": "certify"' in events
    last = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: ")]
    assert any(d.get("chunks_done") == 5 for d in last)

    bound = StoredBound(lip, verified=True, job_id="j-naive")
    ref = chunked_reference(net, x, y, LocalOptions("crown", 0.1, 5.0), bound, 5)
    rows = pooled.get(f"/v1/jobs/{job['id']}/result").json()
    assert [r["certified"] for r in rows["results"]] == ref.columns["certified"].tolist()
    assert [r["radius"] for r in rows["results"]] == ref.columns["radius"].tolist()
    assert [r["label"] for r in rows["results"]] == y.tolist()
    assert rows["certified_accuracy"] == ref.columns["certified"].mean()
    assert rows["accuracy"] == ref.columns["correct"].mean() == res["accuracy"]
    assert rows["lipschitz_bound"] == pytest.approx(lip)

    z = pooled.get(f"/v1/jobs/{job['id']}/result", headers={"accept": NPZ_MEDIA_TYPE})
    assert z.headers["content-type"] == NPZ_MEDIA_TYPE
    with np.load(io.BytesIO(z.content), allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["prediction"], ref.columns["prediction"])
        np.testing.assert_array_equal(arrays["margin"], ref.columns["margin"])
        np.testing.assert_array_equal(arrays["label"], y)
        assert float(arrays["certified_accuracy"]) == rows["certified_accuracy"]


def test_npy_batch_radius_search(pooled: TestClient) -> None:
    mid, _ = _upload(pooled, 1)
    x = np.random.default_rng(5).normal(size=(7, 4))
    buf = io.BytesIO()
    np.save(buf, x)
    r = pooled.post(
        f"/v1/models/{mid}/certifications?time_budget_s=0.5&chunk_rows=4",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 202, r.text
    done = wait_for(job_getter(pooled, r.json()["id"]), ended, timeout_s=240)
    assert done["status"] == "succeeded", done
    rows = pooled.get(f"/v1/jobs/{done['id']}/result").json()["results"]
    assert len(rows) == 7
    assert all(row["radius"] >= row["global_radius"] for row in rows)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "epsilon": -1.0}, "invalid-epsilon"),
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "epsilon": [0.1, 0.2]}, "invalid-epsilon"),
        ({"inputs": [[0.0, 0.0, 0.0]]}, "wrong-input-shape"),
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "method": "nope"}, "unsupported-method"),
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "labels": [5]}, "invalid-input"),
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "bound": "no-such-job"}, "bound-not-found"),
        ({"inputs": [[0.0, 0.0, 0.0, 0.0]], "surprise": 1}, "validation-error"),
    ],
)
def test_bad_batches_are_refused_before_queuing(
    client: TestClient, body: dict[str, Any], code: str
) -> None:
    mid, _ = _upload(client)
    r = client.post(f"/v1/models/{mid}/certifications", json=body)
    assert r.status_code in (404, 422), r.text
    assert_problem(r, r.status_code, code)
    counts = client.app.state.runner.status_counts()  # type: ignore[attr-defined]
    assert sum(counts.values()) == 0


def test_result_route_errors(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/nope/result"), 404, "job-not-found")
    mid, _ = _upload(client)
    bound_job = client.post(f"/v1/models/{mid}/bounds", json={"method": "naive"}).json()
    assert_problem(client.get(f"/v1/jobs/{bound_job['id']}/result"), 404, "result-not-found")
    job = _submit(client, mid, inputs=[[0.0, 1.0, 0.0, 0.0]] * 3, epsilon=0.1, method="crown")
    r = client.get(f"/v1/jobs/{job['id']}/result")
    if r.status_code != 200:  # still queued or running
        assert_problem(r, 409, "job-not-succeeded")
