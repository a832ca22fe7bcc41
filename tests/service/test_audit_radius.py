"""Audit: the service's certified radii stay below the EXACT distance to the decision boundary.

A one-layer classifier f(x) = [w.x, -w.x] has Lip(f) = sqrt(2) ||w|| exactly and its decision
boundary at distance d = |w.x| / ||w|| = m / (sqrt(2) L), so the certified radius is tight: a
radius computed from a rounded margin that is larger than the exact one is wrong, and
x - 1.001 d w/||w|| (inside it) flips the class. Exact margins come from Python fractions
(the weights are float32 numbers, the inputs float64 numbers: both exact rationals).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sdp.ir import Activation, Dense, Network
from sdp.radius import certified_radius
from sdp.rounding import logit_error_bound, unit_roundoff
from service.documents import StoredBound
from tests.service.onnx_nets import mlp_onnx

N = 64


def _weights(seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(size=N).astype(np.float32).astype(np.float64)
    return np.stack([w, -w])


def _near_boundary_inputs(w: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Inputs of norm ~10 whose exact margin 2 w.x is tiny (1e-9 .. 1e-5)."""
    rng = np.random.default_rng(seed)
    x = 10 * rng.normal(size=(count, N))
    x -= np.outer(x @ w, w) / (w @ w)
    x += np.outer(10.0 ** rng.uniform(-9, -5, count), w) / (w @ w)
    return x


def _exact_distance(w: np.ndarray, x: np.ndarray) -> tuple[float, int]:
    """(distance to the boundary, exact class) from the exact dot product."""
    dot = sum(
        (Fraction(float(a)) * Fraction(float(b)) for a, b in zip(w, x, strict=True)), Fraction(0)
    )
    return abs(float(dot)) / float(np.linalg.norm(w)) * (1 - 1e-12), 0 if dot > 0 else 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_service_radius_never_exceeds_the_exact_boundary_distance(make_client, dtype) -> None:
    W = _weights()
    client = make_client(cpu_dtype=dtype)
    mid = client.post("/v1/models", files={"file": ("lin.onnx", mlp_onnx([W]))}).json()["id"]
    lip = float(np.linalg.norm(W, 2)) * (1 + 1e-12)
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "j"}
        ),
    )
    x = _near_boundary_inputs(W[0], 40)
    body = client.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()
    assert body["precision"] == dtype
    oip = client.post(
        f"/v2/models/{mid}/infer",
        json={
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP64",
                    "data": x.ravel().tolist(),
                }
            ]
        },
    ).json()
    radii_oip = next(o for o in oip["outputs"] if o["name"] == "certified_radius")["data"]
    for xi, item, r_oip in zip(x, body["results"], radii_oip, strict=True):
        dist, cls = _exact_distance(W[0], xi)
        assert item["radius"] <= dist, (item, dist)
        assert r_oip <= dist
        if item["radius"] > 0:
            assert item["prediction"] == cls


def test_rounding_bound_covers_float32_forward_passes() -> None:
    """||f32(x) - f(x)|| <= E(x) on random nets with every activation (torch float32 CPU)."""
    torch = pytest.importorskip("torch")
    from models.runtime import TorchNetwork

    rng = np.random.default_rng(4)
    for name, p in [
        ("relu", 0.0),
        ("tanh", 0.0),
        ("gelu", 0.0),
        ("elu", 2.0),
        ("leaky_relu", -0.5),
        ("softplus", 0.0),
        ("sigmoid", 0.0),
        ("silu", 0.0),
    ]:
        ops: list = []
        sizes = [20, 50, 50, 10]
        for i in range(3):
            ops.append(
                Dense(
                    rng.normal(size=(sizes[i + 1], sizes[i])).astype(np.float32)
                    / math.sqrt(sizes[i])
                    * 2,
                    rng.normal(size=sizes[i + 1]),
                )
            )
            if i < 2:
                ops.append(Activation(name, p))  # type: ignore[arg-type]
        net = Network((20,), tuple(ops))
        bound = logit_error_bound(net, unit_roundoff("float32"), safety=4.0)
        x = 5 * rng.normal(size=(200, 20))
        exact = net.forward(x)
        tnet = TorchNetwork.from_network(net, dtype=torch.float32)
        got = tnet(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
        err = np.linalg.norm(got - exact, axis=1)
        est = bound(x)
        assert (err <= est).all(), name
        # float64 (the service default): the bound costs nothing measurable
        b64 = logit_error_bound(net, unit_roundoff("float64"), safety=4.0)
        assert b64(x).max() < 1e-9 * np.abs(exact).max()


def test_pairwise_radius_ignores_unusable_constants() -> None:
    logits = np.array([[2.0, 1.0, 0.0]])
    nan = float("nan")
    pw = np.array([[0.0, nan, 1.0], [nan, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = certified_radius(logits, 1.0, pairwise=pw)
    assert out.radius_pairwise is not None and out.radius_pairwise[0] == 0.0
    zero = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert certified_radius(logits, 1.0, pairwise=zero).radius_pairwise[0] == 0.0
    with_err = certified_radius(logits, 1.0, logit_error=0.1)
    assert with_err.radius[0] == pytest.approx((1.0 - math.sqrt(2) * 0.1) / math.sqrt(2))


def test_cli_verify_never_reports_a_mapped_certificate_as_the_network_bound(
    fixtures_dir, tmp_path
) -> None:
    """A valid certificate for P f (P = 1e-6 e_0^T) must not read as 'Lip(f) <= 3e-5'."""
    import json

    from typer.testing import CliRunner

    from sdp.certificate import Certificate, Lmi, certify_rho, layerwise_multipliers
    from sdp.importers import load_model_file
    from service.cli import app

    mat = fixtures_dir / "lipsdp" / "random_weights.mat"
    net = load_model_file(mat)
    p = np.zeros((1, net.output_size))
    p[0, 0] = 1e-6
    lmi = Lmi.from_chain(net.chain(), output_map=p)
    t = layerwise_multipliers(lmi)
    cert = Certificate(certify_rho(lmi, t), t, output_map=p, network_hash=net.content_hash())
    path = tmp_path / "mapped.json"
    path.write_text(cert.to_json())
    res = CliRunner().invoke(app, ["verify", str(path), str(mat), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "lipschitz_bound" not in out
    assert out["output_map"] == p.tolist()


def test_rounding_bound_covers_conv_and_residual_forward_passes() -> None:
    torch = pytest.importorskip("torch")
    from models.runtime import TorchNetwork
    from sdp.ir import Conv2d, Residual

    rng = np.random.default_rng(0)
    c1 = Conv2d(
        rng.normal(size=(4, 2, 3, 3)) / 3, rng.normal(size=4), (2, 8, 8), (2, 2), (1, 1, 1, 1)
    )
    c2 = Conv2d(rng.normal(size=(4, 4, 3, 3)) / 6, np.zeros(4), c1.out_shape, (1, 1), (1, 0, 1, 2))
    n = c2.out_features
    net = Network(
        (2, 8, 8),
        (
            c1,
            Activation("tanh"),
            Residual((c2, Activation("relu"))),
            Dense(rng.normal(size=(5, n)) / np.sqrt(n), np.zeros(5)),
        ),
    )
    x = 3 * rng.normal(size=(300, 128))
    exact = net.forward(x)
    for name, tdt in (("float32", torch.float32), ("float64", torch.float64)):
        bound = logit_error_bound(net, unit_roundoff(name), safety=4.0)
        got = TorchNetwork.from_network(net, dtype=tdt)(torch.as_tensor(x, dtype=tdt))
        err = np.linalg.norm(got.double().numpy() - exact, axis=1)
        assert (err <= bound(x)).all(), name


def test_overflowing_logits_certify_nothing(make_client) -> None:
    """Inputs that overflow the logits to inf used to get radius inf and certified=true."""
    out = certified_radius(np.array([[np.inf, 0.0], [3.0, 1.0]]), 1.0)
    assert out.radius[0] == 0.0 and out.radius[1] > 0
    w = np.array([[1.0, 2.0], [-1.0, 0.5]])
    client = make_client()
    mid = client.post("/v1/models", files={"file": ("lin.onnx", mlp_onnx([w]))}).json()["id"]
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": 3.0, "method": "naive", "verified": True, "job_id": "j"}
        ),
    )
    r = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[1e308, 1e308]], "labels": [0]})
    assert r.status_code == 200, r.text
    item = r.json()["results"][0]
    assert item["radius"] == 0.0 and item["certified"] is False
    # huge but finite logits (margin 5e199) keep a finite, slightly shrunk radius
    r = client.post(f"/v1/models/{mid}/certify", json={"inputs": [[1e200, -1e200]]})
    got = r.json()["results"][0]["radius"]
    assert 0 < got <= 5e199 / (math.sqrt(2) * 3.0)
    assert got == pytest.approx(5e199 / (math.sqrt(2) * 3.0), rel=1e-9)
