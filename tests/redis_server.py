"""A real ``redis-server`` on a free loopback port, for tests marked ``redis``.

Usage in a test module::

    @pytest.fixture
    def redis_url(tmp_path):
        with redis_server(tmp_path) as url:
            yield url

Persistence is off (``--save "" --appendonly no``) and the working directory is a temp dir,
so nothing outlives the test. Skips (with the reason) when the binary is not installed:
CI installs it with ``apt-get install -y redis-server``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` process on a fixed loopback port that can be stopped and started
    again (an outage). ``appendonly`` keeps its data across the restart, as a production
    Redis for RQ should (``appendfsync always``: nothing acknowledged is lost)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.exe = exe
        self.workdir = Path(workdir) / "redis"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        from redis import Redis
        from redis.exceptions import RedisError

        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else []
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    *(persist or ["--appendonly", "no"]),
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited: {(self.workdir / 'redis.log').read_text()}"
                )
            try:
                if Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def redis_server(workdir: Path, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Start redis-server in ``workdir``; yield ``redis://127.0.0.1:PORT/0``; stop it."""
    server = RedisServer(workdir)
    try:
        server.start(start_timeout_s)
        yield server.url
    finally:
        server.stop()
