"""Certification jobs on RQ: a real redis-server, two real ``lipcert worker`` processes.

The job's batch goes to Redis in chunks that the job's own horse and a helper job take; the
API copies the joined result into its data dir, and the answer equals the library's on the
same chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.documents import StoredBound
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
