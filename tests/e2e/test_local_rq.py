"""Certification jobs on RQ: a real redis-server, two real ``lipcert worker`` processes.

The job's batch goes to Redis in chunks that the job's own horse and a helper job take; the
API copies the joined result into its data dir, and the answer equals the library's on the
same chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis

from service.app import create_app
from service.documents import StoredBound
from service.jobs import certify_rq
from service.jobs.base import JobSpec, now_iso
from service.jobs.certify import certify_chunk, npz, options_of, read_npz
from service.jobs.redis_state import RedisJobs, job_key, model_key
from service.jobs.tasks import load_network
from service.local_certify import LocalOptions
from service.settings import Settings
from tests.e2e.test_rq import worker_process
from tests.redis_server import redis_server
from tests.service.jobs_support import ended, job_getter, wait_for
from tests.service.onnx_nets import mlp_onnx, norm_product
from tests.service.test_api_local import small_net
from tests.service.test_certification_jobs import chunked_reference

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "api-data", queue_url=redis_url, job_timeout_s=600)
    with TestClient(create_app(settings)) as c:
        yield c


def test_two_rq_workers_share_the_chunks(
    client: TestClient, redis_url: str, tmp_path: Path
) -> None:
    weights = small_net(widths=(4, 32, 32, 3))
    mid = client.post("/v1/models", files={"file": ("n.onnx", mlp_onnx(weights))}).json()["id"]
    lip = norm_product(weights)
    bound = StoredBound(lip, method="naive", verified=True, job_id="j-naive")
    client.app.state.storage.save_bound(mid, bound)  # type: ignore[attr-defined]
    x = np.random.default_rng(8).normal(size=(40, 4))
    net = client.app.state.storage.load_network(mid)  # type: ignore[attr-defined]
    y = np.argmax(net.forward(x), axis=1)

    with (
        worker_process(redis_url, tmp_path, "cert-a"),
        worker_process(redis_url, tmp_path, "cert-b"),
    ):
        r = client.post(
            f"/v1/models/{mid}/certifications",
            json={
                "inputs": x.tolist(),
                "labels": y.tolist(),
                "epsilon": 0.05,
                "method": "alpha-crown",
                "chunk_rows": 4,
                "workers": 2,
            },
        )
        assert r.status_code == 202, r.text
        job: dict[str, Any] = wait_for(job_getter(client, r.json()["id"]), ended, timeout_s=300)
    assert job["status"] == "succeeded", job
    res = job["result"]
    assert res["chunks"] == 10 and res["inputs"] == 40
    # the API re-proved every worker's certificate (alpha-crown: slopes in the payloads)
    assert res["rechecked"] is True and res["refused_certificates"] == 0, res
    assert sum(res["chunks_by_worker"].values()) == 10
    # which worker takes which chunk is a race (a fast chunk may be gone before the helper's
    # horse starts); bench/bench_local_jobs.py measures the split and the speed-up
    assert 1 <= len(res["chunks_by_worker"]) <= 2, res["chunks_by_worker"]

    rows = client.get(f"/v1/jobs/{job['id']}/result").json()
    options = LocalOptions("alpha-crown", 0.05, 5.0)  # the same chunks as the job's
    ref = chunked_reference(net, x, y, options, bound, 4)
    assert [row["certified"] for row in rows["results"]] == ref.columns["certified"].tolist()
    assert [row["radius"] for row in rows["results"]] == ref.columns["radius"].tolist()
    assert rows["certified_accuracy"] == ref.columns["certified"].mean()


def test_a_rogue_workers_chunk_is_not_trusted(client: TestClient, redis_url: str) -> None:
    """No worker runs: the test plays one that certifies honestly, then inflates one input's
    certificate and every radius column, and finishes the job as ``run_certification_job``
    does. The API re-proves the certificates: the doctored input keeps only its global-floor
    radius, the others their honest radii, and the refusal is counted."""
    weights = small_net(widths=(4, 32, 32, 3))
    mid = client.post("/v1/models", files={"file": ("n.onnx", mlp_onnx(weights))}).json()["id"]
    bound = StoredBound(norm_product(weights), method="naive", verified=True, job_id="j-naive")
    client.app.state.storage.save_bound(mid, bound)  # type: ignore[attr-defined]
    x = np.random.default_rng(9).normal(size=(12, 4))
    r = client.post(
        f"/v1/models/{mid}/certifications",
        json={"inputs": x.tolist(), "method": "crown", "chunk_rows": 4, "time_budget_s": 2},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    conn = Redis.from_url(redis_url)
    jobs = RedisJobs(conn)
    raw = jobs.raw(job_id)
    spec = JobSpec.from_dict(json.loads(raw["spec"]))
    opts = options_of(spec)
    # the rogue also shrinks the floor bound in the job's spec (the API uses its stored one)
    forged = dict(spec.certify or {}, lipschitz=opts.lipschitz / 1000)
    conn.hset(job_key(job_id), "spec", json.dumps(dict(spec.to_dict(), certify=forged)))
    net = load_network(("bytes", raw["model_sha256"], conn.get(model_key(raw["model_sha256"]))))
    inputs = read_npz(conn.get(certify_rq.key(job_id, "inputs")))
    parts = [certify_chunk(net, inputs, opts, a, b, certificates=True) for a, b in opts.chunks()]
    honest = np.concatenate([p["radius"] for p in parts])
    crown = [i for i, m in enumerate(parts[1]["radius_method"].tolist()) if m == "crown"]
    assert crown, parts[1]["radius_method"]
    parts[1]["cert_epsilon"][crown[0]] *= 50  # the rogue's claim
    for p in parts:
        p["radius"] = p["radius"] * 50
    bundle = {f"c{k}/{n}": a for k, p in enumerate(parts) for n, a in p.items()}
    conn.set(certify_rq.key(job_id, "result"), npz(bundle))
    pending = {"kind": "certification", "rechecked": False, "wall_s": 1.0}
    assert jobs.finish(job_id, "succeeded", result=pending, finished_at=now_iso())

    first = client.get(f"/v1/jobs/{job_id}").json()  # the re-check runs on the re-check pool
    assert first["status"] in ("running", "succeeded"), first
    if first["status"] == "running":
        assert first["progress"]["phase"] == "recheck", first
    job = wait_for(job_getter(client, job_id), ended, timeout_s=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["rechecked"] is True
    assert job["result"]["refused_certificates"] == 1, job["result"]
    rows = client.get(f"/v1/jobs/{job_id}/result").json()["results"]
    bad = 4 + crown[0]
    expected = honest.copy()
    expected[bad] = rows[bad]["global_radius"]
    assert 0 < expected[bad] < honest[bad]
    assert [row["radius"] for row in rows] == expected.tolist()
    assert rows[bad]["radius_method"] == "global"
