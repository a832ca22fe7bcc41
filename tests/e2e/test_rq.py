"""The RQ runner end to end: a real redis-server, real ``lipcert worker`` processes, the app.

The API (TestClient, ``LIPCERT_QUEUE_URL=redis://...``) and the worker share nothing but
Redis: the worker gets the model bytes from Redis by sha256, writes progress, heartbeats and
the result back, and the API stores the result in its own data dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.redis_server import redis_server
from tests.service.jobs_support import (
    LIPSDP_NEURON_RANDOM_WEIGHTS,
    LONG_SOLVE,
    big_random_net,
    ended,
    job_getter,
    lipcert_exe,
    pid_alive,
    post_bound,
    random_weights,
    solving,
    upload,
    wait_for,
    wait_pid_gone,
)

pytestmark = [pytest.mark.redis, pytest.mark.e2e]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


@contextmanager
def worker_process(redis_url: str, logdir: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """``lipcert worker --name NAME`` with LIPCERT_QUEUE_URL; waits until it is registered."""
    from redis import Redis
    from rq import Worker

    env = dict(os.environ, LIPCERT_QUEUE_URL=redis_url, LIPCERT_SOLVER_THREADS="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [lipcert_exe(), "worker", "--name", name],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    conn = Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while name not in {w.name for w in Worker.all(connection=conn)}:
            assert proc.poll() is None, (logdir / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "worker did not register"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # warm shutdown, then cold
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def client(tmp_path: Path, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "api-data", queue_url=redis_url, job_timeout_s=600)
    with TestClient(create_app(settings)) as c:
        assert c.app.state.runner.name == "rq"  # type: ignore[attr-defined]
        yield c


@pytest.mark.slow
def test_rq_worker_certifies_cancels_and_survives_worker_loss(
    client: TestClient, redis_url: str, tmp_path: Path, fixtures_dir: Path
) -> None:
    rw_id = upload(client, random_weights(fixtures_dir), "random_weights.mat")
    big_id = upload(client, big_random_net(), "big.mat")

    with worker_process(redis_url, tmp_path, "solver-a") as worker:
        # 1. the reference value, solved by the worker, persisted by the API, reused
        job = post_bound(client, rw_id, method="lipsdp-neuron")
        job = wait_for(job_getter(client, job["job_id"]), ended)
        assert job["status"] == "succeeded", job
        value = job["result"]["lipschitz_bound"]
        ref = LIPSDP_NEURON_RANDOM_WEIGHTS
        assert ref * (1 - 1e-5) <= value <= ref * 1.001
        assert job["result"]["verified"] is True
        assert job["worker"]["worker"] == "solver-a"
        assert job["result"]["certificate"]["multipliers"]
        assert 'lipcert_jobs{status="succeeded"} 1.0' in client.get("/metrics").text
        again = post_bound(client, rw_id, method="lipsdp-neuron")
        assert again["job_id"] == job["job_id"] and again["reused"] is True
        listed = client.get(f"/v1/models/{rw_id}/bounds").json()["bounds"]
        assert [b["lipschitz_bound"] for b in listed if b.get("job_id") == job["job_id"]] == [value]

        # 2. cancel a long solve: the solver process and the work horse are killed
        long = post_bound(client, big_id, **LONG_SOLVE)
        long = wait_for(job_getter(client, long["job_id"]), solving, timeout_s=120)
        assert long["status"] == "running", long
        solver_pid, horse_pid = long["worker"]["pid"], long["worker"]["horse_pid"]
        assert pid_alive(solver_pid) and pid_alive(horse_pid)
        r = client.delete(f"/v1/jobs/{long['job_id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert wait_pid_gone(solver_pid) and wait_pid_gone(horse_pid)
        assert worker.poll() is None  # the worker itself lives on
        time.sleep(0.5)
        assert job_getter(client, long["job_id"])()["status"] == "cancelled"

        # the same worker still takes jobs; its progress streams as server-sent events
        quick = post_bound(client, rw_id, method="naive")
        names = []
        with client.stream("GET", f"/v1/jobs/{quick['job_id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    names.append(line[len("event: ") :])
        assert names[-1] == "end" and "status" in names, names
        quick = job_getter(client, quick["job_id"])()
        assert quick["status"] == "succeeded", quick

        # 3. the worker machine dies mid-solve (all its processes SIGKILLed at once)
        doomed = post_bound(client, big_id, **LONG_SOLVE)
        doomed = wait_for(job_getter(client, doomed["job_id"]), solving, timeout_s=120)
        assert doomed["status"] == "running", doomed
        client.app.state.runner.heartbeat_timeout_s = 5.0  # type: ignore[attr-defined]
        pids = [worker.pid, doomed["worker"]["horse_pid"], doomed["worker"]["pid"]]
        for pid in pids:  # freeze first so no process can react to the others' death
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait(timeout=10)
        doomed = wait_for(job_getter(client, doomed["job_id"]), ended, timeout_s=60)
        assert doomed["status"] == "failed"
        assert doomed["error"]["code"] == "worker-lost"
        assert "heartbeat" in doomed["error"]["detail"]

    # the API is unaffected, and a new worker picks up new work
    assert client.get(f"/v1/models/{rw_id}").status_code == 200
    with worker_process(redis_url, tmp_path, "solver-b"):
        retry = post_bound(client, big_id, method="naive")
        retry = wait_for(job_getter(client, retry["job_id"]), ended)
        assert retry["status"] == "succeeded", retry
        assert retry["worker"]["worker"] == "solver-b"


@pytest.mark.slow
def test_rq_timeout_and_orphaned_horse(client: TestClient, redis_url: str, tmp_path: Path) -> None:
    big_id = upload(client, big_random_net(), "big.mat")
    with worker_process(redis_url, tmp_path, "solver-c") as worker:
        job = post_bound(client, big_id, **LONG_SOLVE, timeout_s=1.0)
        job = wait_for(job_getter(client, job["job_id"]), ended, timeout_s=120)
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert wait_pid_gone(job["worker"]["pid"])

        # only the worker process is killed: its horse notices, kills the solver, fails the job
        job = post_bound(client, big_id, **LONG_SOLVE)
        job = wait_for(job_getter(client, job["job_id"]), solving, timeout_s=120)
        assert job["status"] == "running", job
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        job = wait_for(job_getter(client, job["job_id"]), ended, timeout_s=60)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "worker-died"
        assert wait_pid_gone(job["worker"]["pid"]) and wait_pid_gone(job["worker"]["horse_pid"])
