"""A sandwich (LBDN) upload gets its closed-form bound verified and stored at once:
certify works without a bound job, with L = gamma (never a number read from metadata)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from models.io import convert_lbdn_jl, lbdn_to_bytes
from models.lbdn import LBDN
from tests.service.jobs_support import ended, job_getter, wait_for


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
    assert len(bounds) == 1 and bounds[0].method == "sandwich"
    assert bounds[0].verified is True
    lip = bounds[0].lipschitz_bound
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


def test_sandwich_job_bound_is_listed_used_and_best(
    client, fixtures_dir: Path, tmp_path: Path
) -> None:
    """A LipSDP job on a 784-input LBDN stores a bound of the very network the API serves.

    The upload is parsed with two BLAS threads, as on a multi-core server, while the job's
    solver process runs on one: the network (and its content hash) must not depend on that
    (the Julia LBDN's Cayley transforms used to differ in the last bits, so the job's bound
    named another network and was never listed, chosen as best or found by job id).
    """
    path = convert_lbdn_jl(fixtures_dir / "lbdn_jl" / "lbdn_mnist_params.npz", tmp_path / "m.st")
    with threadpool_limits(limits=2, user_api="blas"):
        r = client.post("/v1/models", files={"file": ("lbdn.safetensors", path.read_bytes())})
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    upload = client.get(f"/v1/models/{mid}/bounds", params={"full": "true"}).json()
    (closed,) = upload["bounds"]
    cert = closed["certificate"]  # the explicit certificate, not only rho
    assert closed["method"] == "sandwich" and len(cert["multipliers"]) == 2
    assert cert["network_hash"] == closed["network_hash"]
    assert math.isclose(closed["lipschitz_bound"], 5.0, rel_tol=1e-6)

    job = client.post(f"/v1/models/{mid}/bounds", json={"method": "lipsdp-neuron"}).json()
    done = wait_for(job_getter(client, job["job_id"]), ended, timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["progress"]["phase"] == "done"  # not the last solver phase (lower_bound)
    value = done["result"]["lipschitz_bound"]
    assert value < closed["lipschitz_bound"]  # LipSDP 4.975 < gamma = 5 on this net
    listed = client.get(f"/v1/models/{mid}/bounds").json()
    assert {b["method"] for b in listed["bounds"]} == {"sandwich", "lipsdp-neuron"}
    assert listed["best"]["lipschitz_bound"] == value
    x = np.random.default_rng(1).uniform(0, 1, size=(2, 784))
    body = client.post(
        f"/v1/models/{mid}/certify", json={"inputs": x.tolist(), "bound": job["job_id"]}
    )
    assert body.status_code == 200, body.text
    assert body.json()["lipschitz_bound"] == value
