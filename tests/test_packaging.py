"""The two entry scripts, CI's entry point and the container health probe."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/serve", "scripts/test", ".ci/run"]


def _commands(path: Path) -> list[str]:
    """Non-comment, non-blank lines of a shell script, continuations joined."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_bash(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_exactly_scripts_test() -> None:
    commands = _commands(ROOT / ".ci" / "run")
    assert commands[-1] == "exec ./scripts/test"
    assert all(c.startswith(("set ", "cd ")) for c in commands[:-1]), commands


def test_scripts_install_torch_before_lipcert() -> None:
    venv = (ROOT / "scripts" / "_venv.sh").read_text()
    assert venv.index('"torch==$TORCH_VERSION"') < venv.index('-e "$spec"')
    assert "lipcert_venv dev" in (ROOT / "scripts" / "test").read_text()
    serve = _commands(ROOT / "scripts" / "serve")
    assert 'lipcert_venv ""' in serve
    assert serve[-1].startswith('exec "$VENV/bin/lipcert" serve --host "$host" --port "$port"')
    assert 'host="${HOST:-127.0.0.1}"' in serve and 'port="${PORT:-8000}"' in serve


def test_scripts_test_runs_every_check() -> None:
    commands = _commands(ROOT / "scripts" / "test")
    steps = {c.split()[1]: c for c in commands if c.startswith("step ")}
    assert steps["lint"].endswith("-m ruff check .")
    assert steps["types"].endswith("-m mypy")
    assert steps["dockerfile"].endswith('hadolint" --failure-threshold warning Dockerfile')
    assert "--builtin-schema vendor.compose-spec docker-compose.yml" in steps["compose"]
    assert steps["pytest"].endswith('-m pytest --durations=15 "$@"')
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert any(c.startswith(f"export {var}=") for c in commands), var
    assert "command -v redis-server >/dev/null || missing+=(redis-server)" in commands
    assert "command -v curl >/dev/null || missing+=(curl)" in commands
    assert "command -v chromium >/dev/null || missing+=(chromium)" in commands
    assert "command -v chromedriver >/dev/null || missing+=(chromium-driver)" in commands
    assert 'lipcert_apt_install "${missing[@]}"' in commands


def test_venv_helper_accepts_this_venv_and_rejects_a_foreign_one(tmp_path: Path) -> None:
    """``_venv_ok`` trusts a .venv only when its interpreter's prefix is that directory."""
    check = 'source scripts/_venv.sh; VENV="$1"; VPY="$1/bin/python"; _venv_ok'
    prefix = Path(sys.prefix)
    ok = subprocess.run(["bash", "-c", check, "-", str(prefix)], cwd=ROOT)
    assert ok.returncode == 0
    foreign = tmp_path / "venv"
    (foreign / "bin").mkdir(parents=True)
    (foreign / "bin" / "python").symlink_to(Path(sys.executable))
    bad = subprocess.run(["bash", "-c", check, "-", str(foreign)], cwd=ROOT)
    assert bad.returncode != 0


# --- service.healthcheck -------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/v2/health/live" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _probe(port: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "service.healthcheck"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_exit_codes(health_server: http.server.HTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 200
    assert _probe(port).returncode == 0
    _Health.status = 503
    failed = _probe(port)
    assert failed.returncode == 1
    assert f"http://127.0.0.1:{port}/v2/health/live is not live" in failed.stderr
    _Health.status = 200


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert _probe(port).returncode == 1
    assert _probe("not-a-port").returncode == 1


def test_healthcheck_is_stdlib_only() -> None:
    code = "import json, sys, service.healthcheck; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    roots = {name.split(".")[0] for name in json.loads(proc.stdout)}
    extra = roots - set(sys.stdlib_module_names) - {"service", "__main__"}
    extra = {r for r in extra if not r.startswith("_")}  # private stdlib/site helpers
    assert not extra, f"the probe imports third-party modules: {sorted(extra)}"


# --- what a non-editable install ships ----------------------------------------------------------


def test_wheel_ships_the_dashboard_templates_and_assets(tmp_path: Path) -> None:
    """``pip install .`` (the Docker image) must carry every template and static file of the
    dashboard: they are package data, not Python modules."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("sdp", "models", "service"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*cmd, "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("lipcert-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    dashboard = ROOT / "service" / "dashboard"
    wanted = {
        p.relative_to(ROOT).as_posix()
        for sub in ("templates", "static")
        for p in (dashboard / sub).rglob("*")
        if p.is_file()
    }
    assert {"service/dashboard/templates/index.html", "service/dashboard/static/dashboard.js"} <= (
        wanted
    )
    assert wanted - shipped == set(), "dashboard files missing from the wheel"
