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


@contextmanager
def redis_server(workdir: Path, *, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Start redis-server in ``workdir``; yield ``redis://127.0.0.1:PORT/0``; stop it."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    from redis import Redis
    from redis.exceptions import RedisError

    workdir = Path(workdir) / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(workdir / 'redis.log').read_text()}")
            try:
                if Redis.from_url(url, socket_timeout=1).ping():
                    break
            except RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
