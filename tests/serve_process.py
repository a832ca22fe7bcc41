"""A real ``lipcert serve`` (uvicorn) subprocess for the fault tests, plus an HTTP log.

:class:`ServeProcess` starts the server in its own session on a free loopback port and
waits until it is *live* (not ready: a server on a full disk is live but not ready).
:class:`Calls` wraps an ``httpx.Client`` and records every status it received, so a test
can assert that a fault produced no server error (no 500, and 5xx only where expected).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.processes import stop_process_group
from tests.redis_server import free_port
from tests.service.jobs_support import lipcert_exe


class ServeProcess:
    """``lipcert serve`` on ``data_dir`` with extra ``LIPCERT_*`` settings in ``env``."""

    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        env = dict(os.environ, LIPCERT_DATA_DIR=str(self.data_dir), LIPCERT_DEVICE="cpu")
        env.pop("LIPCERT_API_KEY", None)
        env.setdefault("LIPCERT_QUEUE_URL", "")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        env.update(self.env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [lipcert_exe(), "serve", "--port", str(self.port), "--log-level", "warning"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                if httpx.get(self.url + "/v2/health/live", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole session (server and its solver processes)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
        self.proc = None

    def server_errors(self) -> list[str]:
        """Log lines of unhandled errors (the app logs each 500's traceback)."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if "unhandled error" in line]


@contextmanager
def serving(data_dir: Path, log: Path, **env: str) -> Iterator[ServeProcess]:
    srv = ServeProcess(data_dir, log, **env)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


class Calls:
    """An ``httpx.Client`` on ``base_url`` that records ``(method, path, status)``."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)
        self.seen: list[tuple[str, str, int]] = []

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self.client.request(method, path, **kw)
        self.seen.append((method, path, r.status_code))
        return r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)

    def statuses(self, code: int) -> list[tuple[str, str, int]]:
        return [c for c in self.seen if c[2] == code]

    def close(self) -> None:
        self.client.close()


def wait_job(calls: Calls, job_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` (200s only) until the job has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = calls.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = dict(r.json())
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job did not end: {job}"
        time.sleep(0.2)


def wait_status(calls: Calls, job_id: str, pred: Any, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = calls.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = dict(r.json())
        if pred(job):
            return job
        assert time.monotonic() < deadline, f"gave up waiting: {job}"
        time.sleep(0.1)
