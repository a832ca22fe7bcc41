"""A sandwich (LBDN) upload gets its closed-form bound verified and stored at once:
certify works without a bound job, with L = gamma (never a number read from metadata)."""

from __future__ import annotations

import math

import numpy as np
import torch

from models.io import lbdn_to_bytes
from models.lbdn import LBDN


def test_sandwich_upload_is_certifiable_immediately(client) -> None:
    torch.manual_seed(0)
    model = LBDN(6, [16, 16], 3, gamma=2.5, dtype=torch.float64)
    data = lbdn_to_bytes(model, claimed_gamma=0.01)  # a lying claim must not be used
    r = client.post("/v1/models", files={"file": ("lbdn.safetensors", data)})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["kind"] == "sandwich" and info["format"] == "safetensors"
    mid = info["id"]
    bounds = client.app.state.storage.list_bounds(mid)
    assert len(bounds) == 1 and bounds[0]["method"] == "sandwich"
    assert bounds[0]["verified"] is True
    lip = bounds[0]["lipschitz_bound"]
    # verified sqrt(rho) for the explicit multipliers: at most gamma, and not the lying 0.01
    assert 2.4 <= lip <= 2.5 * (1 + 1e-6)
    x = np.random.default_rng(0).normal(size=(4, 6))
    body = client.post(
        f"/v1/models/{mid}/certify", json={"inputs": x.tolist(), "return_logits": True}
    ).json()
    assert body["method"] == "sandwich" and body["lipschitz_bound"] == lip
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()
    for item, row in zip(body["results"], want, strict=True):
        np.testing.assert_allclose(item["logits"], row, rtol=1e-9, atol=1e-9)
        top2 = np.sort(row)[-2:]
        assert abs(item["radius"] - (top2[1] - top2[0]) / (math.sqrt(2) * lip)) < 1e-9
