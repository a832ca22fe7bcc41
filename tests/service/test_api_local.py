"""``POST /v1/models/{id}/certify`` with ``mode: local`` and OIP ``parameters.mode = local``.

The answers are compared with :func:`service.local_certify.certify_rows` (the library) on the
same network; bad input gets 4xx problem+json with stable codes.
"""

from __future__ import annotations

import io
import itertools
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.bodies.media import NPZ_MEDIA_TYPE
from service.documents import StoredBound
from service.local_certify import LocalOptions, certify_rows
from tests.service.onnx_nets import assert_problem, mlp_onnx, norm_product


def small_net(seed: int = 0, widths: tuple[int, ...] = (4, 16, 16, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(o, i)).astype(np.float32) / np.sqrt(i)
        for i, o in itertools.pairwise(widths)
    ]


@pytest.fixture
def local_model(client: TestClient) -> tuple[str, float, np.ndarray, np.ndarray]:
    return _upload_local_model(client)


def _upload_local_model(client: TestClient) -> tuple[str, float, np.ndarray, np.ndarray]:
    """(id, L, x, labels): a 4-16-16-3 ReLU net with a verified naive bound, 6 inputs labelled
    with the net's own predictions (two of them flipped: misclassified)."""
    weights = small_net()
    mid = client.post("/v1/models", files={"file": ("n.onnx", mlp_onnx(weights))}).json()["id"]
    lip = norm_product(weights)
    client.app.state.storage.save_bound(  # type: ignore[attr-defined]
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "j-naive"}
        ),
    )
    x = np.random.default_rng(1).normal(size=(6, 4))
    logits = client.app.state.storage.load_network(mid).forward(x)  # type: ignore[attr-defined]
    y = np.argmax(logits, axis=1)
    y[:2] = (y[:2] + 1) % 3
    return str(mid), lip, x, y


def _library(client: TestClient, mid: str, x: np.ndarray, y: Any, **opts: Any) -> Any:
    net = client.app.state.storage.load_network(mid)  # type: ignore[attr-defined]
    bound = client.app.state.storage.best_bound(mid)  # type: ignore[attr-defined]
    return certify_rows(net, x, None if y is None else np.asarray(y), LocalOptions(**opts), bound)


def test_local_at_epsilon_matches_the_library(client: TestClient, local_model: Any) -> None:
    mid, lip, x, y = local_model
    r = client.post(
        f"/v1/models/{mid}/certify",
        json={
            "inputs": x.tolist(),
            "labels": y.tolist(),
            "mode": "local",
            "epsilon": 0.05,
            "method": "crown",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ref = _library(client, mid, x, y, method="crown", epsilon=0.05)
    assert body["mode"] == "local" and body["method"] == "crown"
    assert body["lipschitz_bound"] == pytest.approx(lip)
    got = body["results"]
    assert [g["prediction"] for g in got] == ref.columns["prediction"].tolist()
    assert [g["certified"] for g in got] == ref.columns["certified"].tolist()
    assert [g["radius"] for g in got] == ref.columns["radius"].tolist()
    assert [g["correct"] for g in got] == (ref.columns["prediction"] == y).tolist()
    assert [g["label"] for g in got] == y.tolist()  # as global mode's rows
    assert not got[0]["certified"] and not got[1]["certified"]  # misclassified: never counted
    assert body["accuracy"] == pytest.approx(4 / 6)
    assert body["certified_accuracy"] == pytest.approx(sum(g["certified"] for g in got) / 6)
    assert body["epsilon"] == 0.05


def test_local_radius_search_never_below_the_global_radius(
    client: TestClient, local_model: Any
) -> None:
    mid, _lip, x, _ = local_model
    r = client.post(
        f"/v1/models/{mid}/certify",
        json={"inputs": x.tolist(), "mode": "local", "time_budget_s": 0.3},
    )
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    glob = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()["results"]
    for row, g in zip(rows, glob, strict=True):
        assert row["radius"] >= row["global_radius"] >= 0
        assert row["global_radius"] == pytest.approx(g["radius"], rel=1e-9, abs=1e-12)
        assert row["radius_method"] in (
            "global",
            "none",
            "ibp",
            "crown",
            "alpha-crown",
            "sdp-crown",
            "bab",
            "beta-crown",
        )
        assert row["prediction"] == g["prediction"]


def test_one_epsilon_per_input_and_npz_both_ways(client: TestClient, local_model: Any) -> None:
    mid, _, x, y = local_model
    eps = np.linspace(0.0, 0.5, len(x))
    buf = io.BytesIO()
    np.savez(buf, inputs=x, labels=y)
    r = client.post(
        f"/v1/models/{mid}/certify?mode=local&method=crown",
        content=buf.getvalue(),
        headers={"content-type": NPZ_MEDIA_TYPE, "accept": NPZ_MEDIA_TYPE},
    )
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        assert z["radius"].shape == (len(x),) and z["radius_method"].dtype.kind == "U"
        assert (z["radius"] >= z["global_radius"]).all()
        assert z["label"].dtype == np.int64 and z["label"].tolist() == y.tolist()
    r = client.post(
        f"/v1/models/{mid}/certify",
        json={"inputs": x.tolist(), "mode": "local", "epsilon": eps.tolist(), "method": "crown"},
    )
    assert r.status_code == 200, r.text
    ref = _library(client, mid, x, None, method="crown", epsilon=eps)
    assert [g["certified"] for g in r.json()["results"]] == ref.columns["certified"].tolist()
    assert [g["epsilon"] for g in r.json()["results"]] == eps.tolist()
    assert r.json()["epsilon"] is None  # not one common eps
    assert all("label" not in g for g in r.json()["results"])  # no labels, no label column


def test_npy_body_local(client: TestClient, local_model: Any) -> None:
    mid, _, x, _ = local_model
    buf = io.BytesIO()
    np.save(buf, x)
    r = client.post(
        f"/v1/models/{mid}/certify?mode=local&epsilon=0.01&method=ibp",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    assert all("certified" in row for row in r.json()["results"])


def test_local_needs_no_bound(client: TestClient) -> None:
    weights = small_net(3)
    mid = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx(weights))}).json()["id"]
    x = np.random.default_rng(2).normal(size=(2, 4))
    r = client.post(
        f"/v1/models/{mid}/certify",
        json={"inputs": x.tolist(), "mode": "local", "epsilon": 0.01, "method": "crown"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["lipschitz_bound"] is None
    assert all(row["global_radius"] == 0 for row in r.json()["results"])
    # the global mode still needs one
    assert_problem(
        client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}),
        409,
        "no-verified-bound",
    )


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ({"mode": "local", "epsilon": -0.1}, 422, "invalid-epsilon"),
        ({"mode": "local", "epsilon": [0.1, 0.2]}, 422, "invalid-epsilon"),
        ({"mode": "local", "epsilon": "1e400"}, 422, "invalid-epsilon"),
        ({"mode": "local", "method": "magic"}, 422, "unsupported-method"),
        ({"mode": "local", "time_budget_s": 1e9}, 422, "invalid-time-budget"),
        ({"mode": "local", "labels": [0, 1, 2, 7, 0, 0]}, 422, "invalid-input"),
        ({"mode": "sideways"}, 422, "validation-error"),
        ({"epsilon": [0.1] * 6}, 422, "invalid-epsilon"),
        ({"epsilon": -1.0}, 422, "invalid-epsilon"),
        ({"method": "crown"}, 422, "local-option-without-local-mode"),
    ],
)
def test_bad_local_requests(
    client: TestClient, local_model: Any, extra: dict[str, Any], status: int, code: str
) -> None:
    mid, _, x, _ = local_model
    body = json.dumps({"inputs": x.tolist(), **extra}).replace('"1e400"', "1e400")  # inf
    r = client.post(
        f"/v1/models/{mid}/certify", content=body, headers={"content-type": "application/json"}
    )
    assert_problem(r, status, code)


def test_nan_and_wrong_shape_are_422(client: TestClient, local_model: Any) -> None:
    mid, _, x, _ = local_model
    bad = x.copy()
    bad[1, 2] = np.nan
    buf = io.BytesIO()
    np.save(buf, bad)
    assert_problem(
        client.post(
            f"/v1/models/{mid}/certify?mode=local",
            content=buf.getvalue(),
            headers={"content-type": "application/x-npy"},
        ),
        422,
    )
    assert_problem(
        client.post(f"/v1/models/{mid}/certify", json={"inputs": [[1.0, 2.0]], "mode": "local"}),
        422,
        "wrong-input-shape",
    )
    buf = io.BytesIO()
    np.save(buf, x)
    assert_problem(
        client.post(
            f"/v1/models/{mid}/certify?mode=local&epsilon=nan",
            content=buf.getvalue(),
            headers={"content-type": "application/x-npy"},
        ),
        422,
    )


def test_batches_over_the_cap_point_to_the_job_route(make_client: Any) -> None:
    client = make_client(max_local_inputs=3)
    weights = small_net()
    mid = client.post("/v1/models", files={"file": ("n.onnx", mlp_onnx(weights))}).json()["id"]
    x = np.zeros((4, 4))
    body = assert_problem(
        client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist(), "mode": "local"}),
        413,
        "local-batch-too-large",
    )
    assert body["jobs"] == f"/v1/models/{mid}/certifications"
    ok = client.post(f"/v1/models/{mid}/certify", json={"inputs": x[:3].tolist(), "mode": "local"})
    assert ok.status_code == 200, ok.text


def test_oip_infer_local_mode(make_client: Any) -> None:
    # OIP has no time_budget_s: the server's LIPCERT_LOCAL_TIME_BUDGET_S (5 s per input by
    # default, 30 s for these 6 inputs) is lowered; the protocol is the point here
    client = make_client(local_time_budget_s=0.3)
    mid, _, x, _ = _upload_local_model(client)
    req = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP64",
                "data": x.ravel().tolist(),
            }
        ],
        "parameters": {"mode": "local"},
    }
    r = client.post(f"/v2/models/{mid}/infer", json=req)
    assert r.status_code == 200, r.text
    out = {t["name"]: t for t in r.json()["outputs"]}
    glob = client.post(f"/v2/models/{mid}/infer", json={**req, "parameters": None}).json()
    gout = {t["name"]: t for t in glob["outputs"]}
    assert out["prediction"]["data"] == gout["prediction"]["data"]
    assert all(
        loc >= g * (1 - 1e-9)
        for loc, g in zip(
            out["certified_radius"]["data"], gout["certified_radius"]["data"], strict=True
        )
    )
    assert r.json()["parameters"]["mode"] == "local"
    bad = client.post(f"/v2/models/{mid}/infer", json={**req, "parameters": {"mode": "x"}})
    assert bad.status_code == 400 and "mode" in bad.json()["error"]  # the protocol's shape
