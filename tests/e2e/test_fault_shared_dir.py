"""Two real ``lipcert serve`` processes on one data dir (local runner).

The second server does not touch the first one's running job (each runner owns its jobs
and keeps a lease); a cancel through the second server stops the first one's solver and
no bound is stored; when the first server dies, the second fails its unfinished job
(``server-restarted``) by itself, without a restart; nothing answers 5xx.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.serve_process import Calls, serving, wait_job, wait_status
from tests.service.jobs_support import (
    LONG_SOLVE,
    big_random_net,
    pid_alive,
    random_weights,
    solving,
    wait_pid_gone,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE = {"LIPCERT_JOB_LEASE_S": "3"}


def _bound_job_ids(http: Calls, model_id: str) -> set[str]:
    r = http.get(f"/v1/models/{model_id}/bounds")
    assert r.status_code == 200, r.text
    return {b.get("job_id") for b in r.json()["bounds"]}


def test_two_servers_share_a_data_dir(tmp_path: Path, fixtures_dir: Path) -> None:
    data_dir = tmp_path / "data"
    with serving(data_dir, tmp_path / "a.log", **LEASE) as a:
        http_a = Calls(a.url)
        big = http_a.post("/v1/models", files={"file": ("big.mat", big_random_net())})
        rw = http_a.post("/v1/models", files={"file": ("rw.mat", random_weights(fixtures_dir))})
        big_id, rw_id = big.json()["id"], rw.json()["id"]
        first = http_a.post(f"/v1/models/{big_id}/bounds", json=LONG_SOLVE).json()
        first = wait_status(http_a, first["job_id"], solving)
        assert first["status"] == "running", first
        solver = first["worker"]["pid"]

        with serving(data_dir, tmp_path / "b.log", **LEASE) as b:
            http_b = Calls(b.url)
            assert http_b.get("/v2/health/ready").status_code == 200
            time.sleep(3.0)  # a few of B's lease rounds: A is alive, its job is left alone
            for http in (http_a, http_b):
                assert http.get(f"/v1/jobs/{first['job_id']}").json()["status"] == "running"
            assert pid_alive(solver)

            own = http_b.post(f"/v1/models/{rw_id}/bounds", json={"method": "naive"}).json()
            assert wait_job(http_b, own["job_id"])["status"] == "succeeded"

            # cancelled through B: A's supervising thread sees it and kills its solver
            r = http_b.delete(f"/v1/jobs/{first['job_id']}")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            assert wait_pid_gone(solver)
            assert http_a.get(f"/v1/jobs/{first['job_id']}").json()["status"] == "cancelled"
            assert first["job_id"] not in _bound_job_ids(http_b, big_id)

            # A dies mid-solve: B fails A's job on its own (A's process is gone)
            second = http_a.post(f"/v1/models/{big_id}/bounds", json=LONG_SOLVE).json()
            second = wait_status(http_a, second["job_id"], solving)
            assert second["status"] == "running", second
            a.kill()
            assert wait_pid_gone(second["worker"]["pid"])
            failed = wait_job(http_b, second["job_id"], timeout_s=30)
            assert failed["status"] == "failed", failed
            assert failed["error"]["code"] == "server-restarted"
            assert second["job_id"] not in _bound_job_ids(http_b, big_id)
            assert own["job_id"] in _bound_job_ids(http_b, rw_id)  # B's own work is kept
            seen = http_a.seen + http_b.seen
    assert [c for c in seen if c[2] >= 500] == []
    assert a.server_errors() == [] and b.server_errors() == []
