"""A real ``lipcert serve`` (uvicorn) killed mid-solve: the solver dies with it, and the next
server on the same data dir reports the job failed ("server restarted") and keeps the bounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.storage import Storage
from tests.redis_server import free_port
from tests.service.jobs_support import (
    LONG_SOLVE,
    big_random_net,
    ended,
    lipcert_exe,
    random_weights,
    solving,
    wait_for,
    wait_pid_gone,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_killed_server_fails_unfinished_jobs_on_restart(tmp_path: Path, fixtures_dir: Path) -> None:
    data_dir = tmp_path / "data"
    storage = Storage(data_dir)  # the same files the server uses (SQLite WAL, shared)
    rw_id = storage.save_model(random_weights(fixtures_dir), "random_weights.mat").id
    big_id = storage.save_model(big_random_net(), "big.mat").id
    port = free_port()
    env = dict(os.environ, LIPCERT_DATA_DIR=str(data_dir), LIPCERT_QUEUE_URL="")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [lipcert_exe(), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    if http.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)

            def getter(job_id: str) -> Any:
                return lambda: http.get(f"/v1/jobs/{job_id}").json()

            done = http.post(f"/v1/models/{rw_id}/bounds", json={"method": "naive"}).json()
            done = wait_for(getter(done["job_id"]), ended)
            assert done["status"] == "succeeded", done

            r = http.post(f"/v1/models/{big_id}/bounds", json=LONG_SOLVE)
            assert r.status_code == 202
            running = wait_for(getter(r.json()["job_id"]), solving, timeout_s=120)
            assert running["status"] == "running", running
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert wait_pid_gone(running["worker"]["pid"])  # the solver died with its server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        log.close()

    settings = Settings(data_dir=data_dir, queue_url="", job_timeout_s=600)
    with TestClient(create_app(settings)) as client:
        stale = client.get(f"/v1/jobs/{running['job_id']}").json()
        assert stale["status"] == "failed"
        assert stale["error"]["code"] == "server-restarted"
        assert "restarted" in stale["error"]["detail"]
        kept = client.get(f"/v1/models/{rw_id}/bounds").json()["bounds"]
        assert done["job_id"] in [b.get("job_id") for b in kept]
        # the failed job is not reused: the same request starts a new job
        r = client.post(f"/v1/models/{big_id}/bounds", json=LONG_SOLVE)
        assert r.json()["job_id"] != running["job_id"]
        client.delete(f"/v1/jobs/{r.json()['job_id']}")
