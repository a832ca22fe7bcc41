"""The lease on saving a job's result (service.jobs.redis_state): a real redis-server.

Several API replicas save a finished job's result once (one holder at a time); an API killed
while it re-checks a certification job's certificates no longer leaves the job ``running`` /
``phase: recheck`` for ever: after its lease expires the restarted API takes the work over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redis import Redis

from service.jobs import certify_rq
from service.jobs.base import JobSpec, now_iso
from service.jobs.certify import certify_chunk, npz, options_of, read_npz
from service.jobs.redis_state import CLAIMED, DONE, HELD, RedisJobs, job_key, model_key
from service.jobs.rq import RqRunner
from service.jobs.tasks import load_network
from service.storage import Storage
from tests.redis_server import redis_server
from tests.serve_process import Calls, ServeProcess, wait_job
from tests.service.onnx_nets import mlp_onnx
from tests.service.test_api_local import small_net

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


def test_one_lease_holder_at_a_time(redis_url: str) -> None:
    conn = Redis.from_url(redis_url)
    jobs = RedisJobs(conn)
    conn.hset(job_key("j"), mapping={"id": "j", "status": "succeeded", "result": "{}"})
    assert jobs.claim_persist("nothere", "a", 5) == DONE  # no such job: nothing to save
    assert not conn.exists(job_key("nothere"))
    assert jobs.claim_persist("j", "a", 0.3) == CLAIMED
    assert jobs.claim_persist("j", "b", 0.3) == HELD  # a live lease is not taken
    assert jobs.renew_persist("j", "a", 0.3) and not jobs.renew_persist("j", "b", 0.3)
    time.sleep(0.4)  # a stopped renewing (died): b takes over
    assert jobs.claim_persist("j", "b", 5) == CLAIMED
    assert not jobs.renew_persist("j", "a", 5)
    assert not jobs.finish_persist("j", "a", ("succeeded",), result={"by": "a"})
    assert jobs.raw("j")["result"] == "{}" and "persisted" not in jobs.raw("j")
    assert jobs.finish_persist("j", "b", ("succeeded",), result={"by": "b"})
    raw = jobs.raw("j")
    assert raw["persisted"] == "1" and json.loads(raw["result"]) == {"by": "b"}
    assert "persist_owner" not in raw and "persist_until" not in raw
    for who in ("a", "b", "c"):  # saved for good
        assert jobs.claim_persist("j", who, 5) == DONE
        assert not jobs.finish_persist("j", who, result={"by": who})
    # a holder that gives up (an error) lets the next reader in at once
    conn.hset(job_key("k"), mapping={"id": "k", "status": "succeeded"})
    assert jobs.claim_persist("k", "a", 60) == CLAIMED
    jobs.release_persist("k", "b")  # not b's: no effect
    assert jobs.claim_persist("k", "b", 60) == HELD
    jobs.release_persist("k", "a")
    assert jobs.claim_persist("k", "b", 60) == CLAIMED


def test_the_holder_renews_its_lease_while_it_works(redis_url: str, tmp_path: Path) -> None:
    runner = RqRunner(Storage(tmp_path / "data"), redis_url, persist_lease_s=0.6)
    jobs = runner.jobs
    runner.redis.hset(job_key("j"), mapping={"id": "j", "status": "succeeded"})
    assert jobs.claim_persist("j", "a", runner.persist_lease_s) == CLAIMED
    with runner._renewing("j", "a"):
        for _ in range(15):  # 1.5 s, 2.5 leases long: never free for another replica
            time.sleep(0.1)
            assert jobs.claim_persist("j", "b", 5) == HELD
    time.sleep(0.7)  # "a" died without finishing: its lease runs out
    assert jobs.claim_persist("j", "b", 5) == CLAIMED


@pytest.mark.slow  # two server starts: 15-40 s on the loaded 2-core machine
def test_an_api_killed_during_the_recheck_is_taken_over(redis_url: str, tmp_path: Path) -> None:
    """No worker runs: the test plays an honest one (as tests/e2e/test_local_rq.py's rogue
    worker test does). The API (a real ``lipcert serve``) re-checks the certificates under a
    1.5 s lease; it is SIGKILLed while it holds the lease, started again on the same data
    dir and Redis, and the job then ends succeeded with the honest radii, re-checked."""
    lease = 1.5
    env = {"LIPCERT_QUEUE_URL": redis_url, "LIPCERT_PERSIST_LEASE_S": str(lease)}
    data = tmp_path / "api-data"
    srv = ServeProcess(data, tmp_path / "serve.log", **env)
    srv.start()
    try:
        calls = Calls(srv.url)
        onnx = mlp_onnx(small_net(widths=(4, 64, 64, 3)))
        mid = calls.post("/v1/models", files={"file": ("n.onnx", onnx)}).json()["id"]
        x = np.random.default_rng(3).normal(size=(300, 4))  # a re-check of about a second
        body = {"inputs": x.tolist(), "method": "crown", "epsilon": 0.05, "chunk_rows": 100}
        r = calls.post(f"/v1/models/{mid}/certifications", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        conn = Redis.from_url(redis_url)
        jobs = RedisJobs(conn)
        raw = jobs.raw(job_id)
        opts = options_of(JobSpec.from_dict(json.loads(raw["spec"])))
        model = conn.get(model_key(raw["model_sha256"]))
        net = load_network(("bytes", raw["model_sha256"], model))
        inputs = read_npz(conn.get(certify_rq.key(job_id, "inputs")))
        parts = [
            certify_chunk(net, inputs, opts, a, b, certificates=True) for a, b in opts.chunks()
        ]
        bundle = {f"c{k}/{n}": a for k, p in enumerate(parts) for n, a in p.items()}
        conn.set(certify_rq.key(job_id, "result"), npz(bundle))
        pending = {"kind": "certification", "rechecked": False, "wall_s": 1.0}
        assert jobs.finish(job_id, "succeeded", result=pending, finished_at=now_iso())

        deadline = time.monotonic() + 30  # the API's watcher starts the re-check within 1 s
        while not conn.hexists(job_key(job_id), "persist_owner"):
            assert time.monotonic() < deadline, jobs.raw(job_id)
            assert not conn.hexists(job_key(job_id), "persisted"), "re-checked before the kill"
            time.sleep(0.005)
        srv.kill()
        calls.close()
    finally:
        srv.stop()
    raw = jobs.raw(job_id)
    # killed inside the re-check: the lease of a dead process, nothing saved
    assert "persisted" not in raw and raw.get("persist_owner"), raw
    assert json.loads(raw["result"])["rechecked"] is False

    srv = ServeProcess(data, tmp_path / "serve2.log", **env)
    srv.start()
    try:
        calls = Calls(srv.url)
        job = wait_job(calls, job_id, timeout_s=120)
        assert job["status"] == "succeeded", job
        res = job["result"]
        assert res["rechecked"] is True and res["refused_certificates"] == 0, res
        assert res["inputs"] == 300
        rows = calls.get(f"/v1/jobs/{job_id}/result").json()["results"]
        assert srv.server_errors() == []
        calls.close()
    finally:
        srv.stop()
    honest = np.concatenate([p["radius"] for p in parts])
    assert [row["radius"] for row in rows] == honest.tolist()
    certified = np.concatenate([p["certified"] for p in parts])
    assert certified.any() and not certified.all()  # the check can tell them apart
    assert [row["certified"] for row in rows] == certified.tolist()
    raw = jobs.raw(job_id)
    assert raw["persisted"] == "1" and "persist_owner" not in raw
