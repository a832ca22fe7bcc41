"""Certify with ``Accept: application/x-npz``: the columnar answer carries exactly the per-row
JSON answer's numbers, radii are margin / (sqrt(2) L) of independently computed logits, content
negotiation picks the right media type, errors stay problem+json; and the one-pass input norms
behind the rounding bound are upper bounds (exact rational arithmetic)."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import onnxruntime as ort
import pytest

from sdp.rounding import row_norm_upper_bounds
from service.bodies.media import NPZ_MEDIA_TYPE, prefers_npz
from service.documents import StoredBound
from tests.service.onnx_nets import assert_problem, mlp_onnx, norm_product

NPZ = {"accept": NPZ_MEDIA_TYPE}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz(resp) -> dict[str, np.ndarray]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == NPZ_MEDIA_TYPE
    assert "accept" in resp.headers["vary"].lower()
    with np.load(io.BytesIO(resp.content), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


@pytest.fixture
def net3():
    """A 4-16-16-3 ReLU MLP with biases (three classes, so the margin is top1 - top2)."""
    rng = np.random.default_rng(7)
    shapes = [(16, 4), (16, 16), (3, 16)]
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    biases = [rng.normal(scale=0.1, size=s[0]).astype(np.float32) for s in shapes]
    return mlp_onnx(weights, biases), norm_product(weights)


@pytest.fixture
def model3(client, net3):
    onnx_bytes, lip = net3
    mid = client.post("/v1/models", files={"file": ("net3.onnx", onnx_bytes)}).json()["id"]
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "job-3"}
        ),
    )
    return mid, lip, onnx_bytes


def test_npz_equals_row_json_and_radii_are_margin_over_sqrt2_l(client, model3) -> None:
    mid, lip, onnx_bytes = model3
    x = np.random.default_rng(0).normal(size=(200, 4))
    labels = [i % 3 for i in range(200)]
    body = {"inputs": x.tolist(), "labels": labels, "return_logits": True, "epsilon": 0.01}
    path = f"/v1/models/{mid}/certify"
    js = client.post(path, json=body)
    assert js.status_code == 200 and js.headers["content-type"] == "application/json"
    rows = js.json()
    z = _npz(client.post(path, json=body, headers=NPZ))

    # the same numbers, bit for bit, in both layouts
    assert sorted(z) == sorted(
        [
            "prediction",
            "margin",
            "radius",
            "label",
            "correct",
            "certified",
            "logits",
            "lipschitz_bound",
            "method",
            "bound_job_id",
            "accuracy",
            "certified_accuracy",
            "epsilon",
            "model_id",
            "precision",
        ]
    )
    assert z["prediction"].dtype == np.int64 and z["radius"].dtype == np.float64
    assert z["certified"].dtype == bool and z["logits"].shape == (200, 3)
    res = rows["results"]
    assert z["prediction"].tolist() == [r["prediction"] for r in res]
    assert z["margin"].tolist() == [r["margin"] for r in res]
    assert z["radius"].tolist() == [r["radius"] for r in res]
    assert z["label"].tolist() == labels == [r["label"] for r in res]
    assert z["certified"].tolist() == [r["certified"] for r in res]
    assert z["correct"].tolist() == [r["correct"] for r in res]
    assert z["logits"].tolist() == [r["logits"] for r in res]
    for key in ("lipschitz_bound", "accuracy", "certified_accuracy", "epsilon"):
        assert z[key].shape == () and float(z[key]) == rows[key]
    for key in ("method", "bound_job_id", "model_id", "precision"):
        assert str(z[key]) == rows[key]
    assert str(z["bound_job_id"]) == "job-3" and str(z["precision"]) == "float64"

    # independently: onnxruntime's logits, top-1 minus top-2, divided by sqrt(2) L
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x.astype(np.float32)})[0].astype(np.float64)
    top2 = np.sort(ref, axis=1)[:, -2:]
    ref_margin = top2[:, 1] - top2[:, 0]
    clear = ref_margin > 1e-3  # away from ties, float32 ORT and float64 agree on the class
    assert clear.sum() > 150
    assert np.array_equal(z["prediction"][clear], ref.argmax(axis=1)[clear])
    np.testing.assert_allclose(z["margin"], ref_margin, rtol=1e-4, atol=1e-4)
    # and exactly from the returned float64 logits: radius <= margin / (sqrt(2) L), and only
    # the float64 rounding allowance sqrt(2) E / (sqrt(2) L) (E ~ 1e-13 here) below it
    f = z["logits"]
    s2 = np.sort(f, axis=1)[:, -2:]
    margin = s2[:, 1] - s2[:, 0]
    assert np.array_equal(z["margin"], margin)
    exact = margin / (math.sqrt(2) * lip)
    assert np.all(z["radius"] <= exact)
    np.testing.assert_allclose(z["radius"], exact, rtol=1e-9, atol=1e-12)
    cert = (z["prediction"] == np.asarray(labels)) & (z["radius"] > 0.01)
    assert np.array_equal(z["certified"], cert)
    assert float(z["certified_accuracy"]) == pytest.approx(cert.mean())


def test_npy_body_npz_answer_with_pairwise(client, model3) -> None:
    mid, lip, _ = model3
    pw = np.full((3, 3), lip / 2)
    np.fill_diagonal(pw, 0.0)
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {
                "lipschitz_bound": lip * 0.9,
                "method": "lipsdp-neuron",
                "verified": True,
                "pairwise": pw.tolist(),
                "job_id": "job-pw",
            }
        ),
    )
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    path = f"/v1/models/{mid}/certify?bound=job-pw&return_logits=true"
    hdr = {"content-type": "application/x-npy"}
    rows = client.post(path, content=_npy(x), headers=hdr).json()
    z = _npz(client.post(path, content=_npy(x), headers={**hdr, **NPZ}))
    res = rows["results"]
    assert z["radius"].tolist() == [r["radius"] for r in res]
    assert z["radius_pairwise"].tolist() == [r["radius_pairwise"] for r in res]
    assert "label" not in z and "accuracy" not in z and "certified" not in z
    assert float(z["lipschitz_bound"]) == pytest.approx(lip * 0.9)
    # with L_yj = L/2 for every pair: r_pw = min_j (f_y - f_j) / L_yj = margin / (L / 2)
    s2 = np.sort(z["logits"], axis=1)[:, -2:]
    want = (s2[:, 1] - s2[:, 0]) / (lip / 2)
    assert np.all(z["radius_pairwise"] <= want)
    np.testing.assert_allclose(z["radius_pairwise"], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("accept", "npz"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("text/html", False),
        (NPZ_MEDIA_TYPE, True),
        ("application/x-npz, application/json", True),
        ("application/json;q=0.9, application/x-npz", True),
        ("application/x-npz;q=0.5, application/json", False),
        ("application/x-npz;q=0.5, */*;q=0.1", True),
        ("application/x-npz;q=0", False),
        ("application/x-npz;q=oops", False),
        ("Application/X-NPZ ; Q=1", True),
        ("application/*;q=0.2, application/x-npz;q=0.1", False),  # json gets 0.2
        ("application/*;q=0.1, application/x-npz;q=0.2", True),
    ],
)
def test_content_negotiation(accept, npz) -> None:
    assert prefers_npz(accept) is npz


def test_negotiation_over_http(client, model3) -> None:
    mid, _, _ = model3
    path = f"/v1/models/{mid}/certify"
    for accept, ctype in (
        ("application/json;q=1, application/x-npz;q=0.5", "application/json"),
        ("application/x-npz;q=0.8, application/json;q=0.2", NPZ_MEDIA_TYPE),
    ):
        r = client.post(path, json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}, headers={"accept": accept})
        assert r.status_code == 200 and r.headers["content-type"] == ctype


def test_errors_stay_problem_json_with_npz_accept(client, model3, net3) -> None:
    mid, _, _ = model3
    path = f"/v1/models/{mid}/certify"
    assert_problem(client.post(path, json={"inputs": [[1, 2]]}, headers=NPZ), 422)
    assert_problem(
        client.post("/v1/models/ffffffffffffffff/certify", json={"inputs": [[1]]}, headers=NPZ),
        404,
    )
    assert_problem(
        client.post(path, content=b"\x93NUMPY junk", headers={**NPZ, "content-type": "x/y"}),
        415,
    )
    other = client.post("/v1/models", files={"file": ("b.onnx", net3[0] + b"")})
    assert other.status_code in (200, 201)
    # a model without a verified bound
    rng = np.random.default_rng(3)
    fresh = mlp_onnx([rng.normal(size=(3, 4)).astype(np.float32)])
    fid = client.post("/v1/models", files={"file": ("f.onnx", fresh)}).json()["id"]
    assert_problem(
        client.post(f"/v1/models/{fid}/certify", json={"inputs": [[0, 0, 0, 0]]}, headers=NPZ),
        409,
        "no-verified-bound",
    )


def test_non_finite_epsilon_is_422(client, model3) -> None:
    mid, _, _ = model3
    x = _npy(np.zeros((1, 4)))
    for value in ("inf", "nan"):
        assert_problem(
            client.post(
                f"/v1/models/{mid}/certify?epsilon={value}",
                content=x,
                headers={"content-type": "application/x-npy"},
            ),
            422,
        )


def _exact_norm_below(bound: float, row: np.ndarray) -> bool:
    """||row||_2 <= bound, decided in exact rational arithmetic."""
    return sum(Fraction(float(v)) ** 2 for v in row) <= Fraction(bound) ** 2


def test_row_norm_upper_bounds_even_at_extremes() -> None:
    rng = np.random.default_rng(5)
    rows = [
        rng.normal(size=50),
        rng.uniform(0, 1, size=50),
        np.full(50, 1e200),  # the sum of squares overflows
        np.full(50, 1e-170),  # the squares underflow
        np.concatenate([[1.0], np.full(49, 1e-170)]),
        np.full(50, 5e-324),  # subnormal
        np.zeros(50),
        np.concatenate([[1e300], np.zeros(49)]),
        rng.normal(size=50) * 1e-150,
        np.array([3.0, 4.0] + [0.0] * 48),
    ]
    x = np.vstack(rows)
    got = row_norm_upper_bounds(x)
    for b, row in zip(got, x, strict=True):
        assert math.isfinite(b) and b >= 0
        assert _exact_norm_below(float(b), row)
        # and tight: at most 1e-10 relative (plus the smallest normal 2^-1022) above it
        exact_sq = sum(Fraction(float(v)) ** 2 for v in row)
        slack = Fraction(b) - Fraction(2.0**-1022)
        assert slack <= 0 or slack**2 <= exact_sq * Fraction(1 + 1e-10) ** 2


def test_worker_logit_error_dominates_the_exact_norm_bound(client, model3) -> None:
    """E(x) used for the radii >= e0 + e1 ||x|| with the exact norm."""
    mid, _, _ = model3
    client.post(f"/v1/models/{mid}/certify", json={"inputs": [[0, 0, 0, 0]]})  # load the model
    worker = client.app.state.worker
    bound = worker._error_bounds[mid]
    x = np.random.default_rng(6).normal(size=(20, 4)) * np.logspace(-160, 160, 20)[:, None]
    err = worker.logit_error(mid, x)
    for e, row in zip(err, x, strict=True):
        norm_sq = sum(Fraction(float(v)) ** 2 for v in row)
        # e >= e0 + e1 * ||x||  <=>  (e - e0) / e1 >= ||x|| (all terms >= 0)
        lhs = (Fraction(float(e)) - Fraction(bound.e0)) / Fraction(bound.e1)
        assert lhs >= 0 and lhs**2 >= norm_sq
