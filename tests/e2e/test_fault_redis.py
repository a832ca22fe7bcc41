"""A Redis outage in RQ mode, for real: ``lipcert serve``, a ``lipcert worker`` and a
``redis-server`` (append-only file on, as production should run it) that is stopped in the
middle of a solve and started again on the same port.

While Redis is down the API answers 503 ``queue-unavailable`` with ``Retry-After`` (never
500) and is not ready (live stays true); the worker survives; once Redis is back the job
that was running finishes and its bound is recorded, and the same worker takes new work.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.test_rq import worker_process
from tests.redis_server import RedisServer
from tests.serve_process import Calls, serving, wait_job, wait_status
from tests.service.jobs_support import big_random_net, solving

pytestmark = [pytest.mark.redis, pytest.mark.e2e, pytest.mark.slow]

HEARTBEAT_TIMEOUT_S = 4.0


def test_redis_outage_mid_solve(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path, appendonly=True)
    redis.start()
    try:
        env = {
            "LIPCERT_QUEUE_URL": redis.url,
            "LIPCERT_WORKER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        }
        with (
            serving(tmp_path / "data", tmp_path / "serve.log", **env) as srv,
            worker_process(redis.url, tmp_path, "solver-o") as worker,
        ):
            http = Calls(srv.url)
            body = big_random_net((20, 120, 120, 10), seed=3)
            model_id = http.post("/v1/models", files={"file": ("m.mat", body)}).json()["id"]
            job = http.post(f"/v1/models/{model_id}/bounds", json={"method": "lipsdp-neuron"})
            assert job.status_code == 202, job.text
            job_id = job.json()["job_id"]
            assert wait_status(http, job_id, solving)["status"] in ("running", "succeeded")

            redis.stop()  # --- outage ---
            r = http.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "queue-unavailable"
            assert int(r.headers["retry-after"]) > 0
            r = http.post(f"/v1/models/{model_id}/bounds", json={"method": "naive"})
            assert r.status_code == 503 and r.json()["code"] == "queue-unavailable", r.text
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 503
            assert "queue-unavailable" in [x["code"] for x in ready.json()["reasons"]]
            assert http.get("/v2/health/live").status_code == 200
            assert http.get(f"/v1/models/{model_id}").status_code == 200  # storage unaffected
            time.sleep(HEARTBEAT_TIMEOUT_S + 2)  # longer than the heartbeat timeout
            assert worker.poll() is None, "the worker exited during the outage"

            redis.start()  # --- back, same port, same data ---
            deadline = time.monotonic() + 30
            while http.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready after Redis came back"
                time.sleep(0.2)
            done = wait_job(http, job_id, timeout_s=300)
            assert done["status"] == "succeeded", done
            assert done["worker"]["worker"] == "solver-o"
            bounds = http.get(f"/v1/models/{model_id}/bounds").json()["bounds"]
            assert [b["job_id"] for b in bounds if b.get("job_id") == job_id] == [job_id]

            # the same worker process resumed taking jobs
            assert worker.poll() is None
            again = http.post(f"/v1/models/{model_id}/bounds", json={"method": "naive"}).json()
            again = wait_job(http, again["job_id"], timeout_s=120)
            assert again["status"] == "succeeded", again
            assert again["worker"]["worker"] == "solver-o"
        outage_503 = {("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/models/{model_id}/bounds")}
        outage_503.add(("GET", "/v2/health/ready"))
        errors = [c for c in http.seen if c[2] >= 500 and (c[0], c[1]) not in outage_503]
        assert errors == [] and not http.statuses(500)
        assert srv.server_errors() == []
    finally:
        redis.stop()


@pytest.mark.redis
def test_a_server_starts_without_redis_and_becomes_ready_when_it_comes(tmp_path: Path) -> None:
    """Redis down at start: the API starts (live), is not ready, answers job routes 503
    with Retry-After; a job event stream open during an outage ends with an error event."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    redis = RedisServer(tmp_path, appendonly=True)  # port chosen, not started yet
    settings = Settings(data_dir=tmp_path / "data", queue_url=redis.url)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/v2/health/live").status_code == 200
            ready = client.get("/v2/health/ready")
            assert ready.status_code == 503
            assert [x["code"] for x in ready.json()["reasons"]] == ["queue-unavailable"]
            r = client.get("/v1/jobs/0123")
            assert r.status_code == 503 and r.json()["code"] == "queue-unavailable"
            assert r.headers["retry-after"] == "5"

            redis.start()
            deadline = time.monotonic() + 20
            while client.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready after Redis came"
                time.sleep(0.2)
            assert client.get("/v1/jobs/0123").status_code == 404

            storage = client.app.state.storage  # type: ignore[attr-defined]
            model_id = storage.save_model(big_random_net((4, 8, 2)), "tiny.mat").id
            job = client.post(f"/v1/models/{model_id}/bounds", json={"method": "naive"}).json()
            with client.stream("GET", f"/v1/jobs/{job['job_id']}/events") as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("event: "))
                redis.stop()  # no worker: the job stays queued until the outage
                events = [line for line in lines if line.startswith(("event: ", "data: "))]
            assert events[-2] == "event: error" and "queue-unavailable" in events[-1]
    finally:
        redis.stop()
