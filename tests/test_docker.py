"""The Dockerfile, .dockerignore and compose files: structure, and the image's CMD and
HEALTHCHECK commands run for real (no Docker engine here, so they run on this machine with the
image's environment mapped onto the checkout: /opt/venv/bin -> this venv, /data -> a temp dir).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dockerfile_reader import Dockerfile, exec_form, healthcheck, parse

from tests.processes import stop_process_group

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
COMPOSE = ["docker-compose.yml", "docker-compose.gpu.yml"]
ServerFixture = tuple[dict[str, str], subprocess.Popen]


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(ROOT / "Dockerfile")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_multi_stage_slim_python_base(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2
    args = dockerfile.stage_args()
    for stage in dockerfile.stages:
        base = stage.base.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        assert base == "python:3.11-slim"
    # The final stage takes the venv from the build stage (no compilers, no pip cache).
    build = dockerfile.stages[0].name
    copies = dockerfile.final.all("COPY")
    assert any(f"--from={build} /opt/venv /opt/venv" in c for c in copies), copies


def test_torch_flavour_build_arg(dockerfile: Dockerfile) -> None:
    args = dockerfile.stage_args()
    assert args["TORCH_FLAVOUR"] == "cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    runs = " ".join(dockerfile.stages[0].all("RUN"))
    assert "https://download.pytorch.org/whl/${TORCH_FLAVOUR}" in runs
    assert '"torch==${TORCH_VERSION}"' in runs
    # torch is installed before lipcert so lipcert's dependency resolution keeps that wheel.
    assert runs.index("torch==") < runs.index("pip install --no-cache-dir .")


def test_torch_pins_agree() -> None:
    """Dockerfile, scripts and pyproject name the same torch."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.4,<2.15"' in pyproject
    assert 'TORCH_VERSION="2.13.0"' in (ROOT / "scripts" / "_venv.sh").read_text()
    assert parse(ROOT / "Dockerfile").stage_args()["TORCH_VERSION"] == "2.13.0"


def test_runtime_user_port_volume(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root id: {user}"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert final.last("EXPOSE") == "8000"
    assert exec_form(final.last("VOLUME")) == ["/data"]
    env = final.env()
    assert env["LIPCERT_DATA_DIR"] == "/data"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_cmd_and_healthcheck_are_exec_form(dockerfile: Dockerfile) -> None:
    cmd = exec_form(dockerfile.final.last("CMD"))
    assert cmd[:2] == ["lipcert", "serve"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == dockerfile.final.last("EXPOSE")
    options, probe = healthcheck(dockerfile.final)
    assert probe == ["python", "-m", "service.healthcheck"]
    assert {"interval", "timeout", "retries"} <= options.keys()


def test_dockerignore_keeps_only_sources() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # deny everything (.venv, .git, data, caches) ...
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    # ... except exactly what the Dockerfile copies.
    copied = set()
    for copy in parse(ROOT / "Dockerfile").stages[0].all("COPY"):
        copied.update(p.rstrip("/").removeprefix("./") for p in copy.split()[:-1])
    assert copied == allowed


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    api = services["api"]
    assert "profiles" not in api
    assert api["ports"] == ["${LIPCERT_PORT:-8000}:8000"]
    assert "lipcert-data:/data" in api["volumes"]
    assert api["environment"]["LIPCERT_DATA_DIR"] == "/data"
    assert api["healthcheck"]["test"] == ["CMD", *healthcheck(parse(ROOT / "Dockerfile").final)[1]]
    for name in ("redis", "worker"):
        assert services[name]["profiles"] == ["scale"]
    worker = services["worker"]
    assert worker["command"] == ["lipcert", "worker"]
    assert worker["environment"]["LIPCERT_QUEUE_URL"] == "redis://redis:6379/0"
    assert "volumes" not in worker  # workers get model bytes through Redis, no shared disk
    assert api["depends_on"]["redis"] == {"condition": "service_healthy", "required": False}
    assert worker["healthcheck"] == {"disable": True}  # the HTTP probe is for the API only
    assert worker["image"] == api["image"]


def test_compose_gpu_override_reserves_gpus() -> None:
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    devices = gpu["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["services"]["api"]["build"]["args"]["TORCH_FLAVOUR"].startswith(
        "${TORCH_FLAVOUR:-cu"
    )


def test_hadolint_has_no_warnings() -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_files_match_the_compose_spec() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            *COMPOSE,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the image's commands, run for real ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_env(dockerfile: Dockerfile, data_dir: Path) -> dict[str, str]:
    """The final stage's ENV with the image's paths mapped onto this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPCERT_")}
    for key, value in dockerfile.final.env().items():
        value = value.replace("/opt/venv/bin", str(VENV_BIN))
        value = value.replace("$PATH", os.environ.get("PATH", ""))
        env[key] = value
    assert env["LIPCERT_DATA_DIR"] == "/data"
    env["LIPCERT_DATA_DIR"] = str(data_dir)
    return env


def _probe(dockerfile: Dockerfile, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    _, probe = healthcheck(dockerfile.final)
    return subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def image_server(
    dockerfile: Dockerfile, tmp_path: Path
) -> Iterator[tuple[dict[str, str], subprocess.Popen]]:
    """The image's CMD on a free port (the only change: ``--port``), data in a temp dir."""
    cmd = exec_form(dockerfile.final.last("CMD"))
    port = _free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    env = _image_env(dockerfile, tmp_path / "data")
    probe_env = {**env, "PORT": str(port)}  # the probe's port; the image uses the default 8000
    assert _probe(dockerfile, probe_env).returncode != 0, "something already answers there"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield probe_env, proc
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.e2e
def test_image_cmd_serves_and_healthcheck_follows_it(
    dockerfile: Dockerfile, image_server: ServerFixture, tmp_path: Path
) -> None:
    env, proc = image_server
    deadline = time.monotonic() + 120
    while True:
        result = _probe(dockerfile, env)
        if result.returncode == 0:
            break
        log = (tmp_path / "server.log").read_text()
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log}"
        assert time.monotonic() < deadline, f"never healthy:\n{log}"
        time.sleep(0.5)
    assert (tmp_path / "data").is_dir()  # LIPCERT_DATA_DIR is where the server keeps its state

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    down = _probe(dockerfile, env)
    assert down.returncode == 1
    assert "not live" in down.stderr
