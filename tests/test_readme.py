"""README.md stays true: its commands are the ones CI runs, run here, or match the Docker files.

Every ``sh`` block in the README is preceded by ``<!-- check: KIND -->``:
``ci`` (the two entry scripts, run by CI), ``tour`` (curl against a live ``./scripts/serve``),
``cli`` (the ``lipcert`` commands) or ``docker`` (compared with Dockerfile/compose: no engine).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from dockerfile_reader import exec_form, parse

from tests.processes import stop_process_group

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- check: (\w+) -->\n)?```sh\n(.*?)```", re.S)


def blocks(kind: str | None = None) -> list[str]:
    found = [(k, body) for k, body in BLOCK.findall(README)]
    return [body for k, body in found if kind is None or k == kind]


def commands(kind: str) -> list[str]:
    return [line for body in blocks(kind) for line in body.splitlines() if line.strip()]


def test_every_shell_block_says_how_it_is_checked() -> None:
    kinds = [k for k, _ in BLOCK.findall(README)]
    assert kinds and all(k in {"ci", "tour", "cli", "docker"} for k in kinds), kinds
    assert README.count("```sh") == len(kinds)


def test_first_two_commands_are_serve_then_test() -> None:
    first = [line for body in blocks() for line in body.splitlines() if line.strip()][:2]
    assert first == ["./scripts/serve", "./scripts/test"]
    assert commands("ci") == first
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec ./scripts/test" in ci


def test_radius_formula_is_stated() -> None:
    assert "radius = margin / (sqrt(2) L)" in README


def test_configuration_table_matches_settings() -> None:
    from service.settings import Settings

    table = dict(re.findall(r"^\| `(LIPCERT_[A-Z0-9_]+)` \| (.*?) \|", README, re.M))
    fields = Settings.model_fields
    assert set(table) == {f"LIPCERT_{name.upper()}" for name in fields}
    for name, field in fields.items():
        shown = table[f"LIPCERT_{name.upper()}"]
        if field.default_factory is not None:
            continue  # data_dir: platform dependent, described in words
        if field.default is None:
            assert shown == "unset", name
        elif field.default == "":
            assert shown == "empty", name
        else:
            assert shown == f"`{field.default}`", name


# --- the Docker commands agree with the Docker files ---------------------------------------


def _docker_commands() -> list[list[str]]:
    return [shlex.split(line) for line in commands("docker")]


def test_docker_commands_match_dockerfile() -> None:
    dockerfile = parse(ROOT / "Dockerfile")
    args = dockerfile.stage_args()
    port = dockerfile.final.last("EXPOSE")
    volume = exec_form(dockerfile.final.last("VOLUME"))[0]
    built: set[str] = set()
    runs = 0
    for argv in _docker_commands():
        if argv[:2] == ["docker", "build"]:
            built.add(argv[argv.index("-t") + 1])
            assert argv[-1] == "."
            for i, token in enumerate(argv):
                if token == "--build-arg":
                    assert argv[i + 1].split("=")[0] in args, argv[i + 1]
        elif argv[:2] == ["docker", "run"]:
            runs += 1
            assert argv[argv.index("-p") + 1] == f"{port}:{port}"
            assert argv[argv.index("-v") + 1].endswith(f":{volume}")
            assert argv[-1] in built, f"runs an image the README never built: {argv[-1]}"
            for i, token in enumerate(argv):
                if token == "-e":
                    assert argv[i + 1].startswith("LIPCERT_")
            if "--gpus" in argv:
                assert "--build-arg" in " ".join(commands("docker"))
    assert runs == 2 and built == {"lipcert", "lipcert:cuda"}


def test_compose_commands_match_compose_files() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    seen_scale = False
    for argv in _docker_commands():
        env = {}
        while argv and "=" in argv[0]:
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        if argv[:2] != ["docker", "compose"]:
            continue
        for i, token in enumerate(argv):
            if token == "-f":
                assert (ROOT / argv[i + 1]).is_file(), argv[i + 1]
            if token == "--profile":
                assert argv[i + 1] in profiles
            if token == "--scale":
                service, _, count = argv[i + 1].partition("=")
                assert service in services and int(count) > 1
                seen_scale = True
        if "--profile" in argv:
            # The API must queue into the same Redis the workers read.
            assert (
                env["LIPCERT_QUEUE_URL"] == services["worker"]["environment"]["LIPCERT_QUEUE_URL"]
            )
            assert services["api"]["environment"]["LIPCERT_QUEUE_URL"] == "${LIPCERT_QUEUE_URL:-}"
    assert seen_scale
    # The plain `docker compose up` image is the one `docker build -t lipcert .` makes.
    assert services["api"]["image"] == "lipcert:${LIPCERT_IMAGE_TAG:-latest}"


# --- the tour and the CLI, run for real -----------------------------------------------------


def _example_module() -> Any:
    """scripts/example_model.py, the README's example network."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import example_model
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return example_model


def _example_network() -> list[np.ndarray]:
    """Weights of the README's example network, as stored in the ONNX file (float32)."""
    example = _example_module()
    _, weights = example.build_mlp(np.random.default_rng(example.SEED))
    return [w.astype(np.float32).astype(np.float64) for w in weights]


def _logits_and_lower_bound(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Logits of the example net at ``points`` and max ||J(x)||_2 there (<= true L)."""
    weights = _example_network()
    logits, best = [], 0.0
    for x in points:
        h, jac = x, np.eye(x.size)
        for k in range(0, len(weights), 2):
            h = weights[k] @ h + weights[k + 1]
            jac = weights[k] @ jac
            if k + 2 < len(weights):
                active = (h > 0).astype(float)
                h, jac = h * active, jac * active[:, None]
        logits.append(h)
        best = max(best, float(np.linalg.norm(jac, 2)))
    return np.array(logits), best


def _naive_bound() -> float:
    weights = _example_network()
    return float(np.prod([np.linalg.norm(w, 2) for w in weights[::2]]))


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _run_block(body: str, port: int | None = None, timeout: float = 600) -> str:
    script = body.replace(".venv/bin/", f"{VENV_BIN}/")
    if port is not None:
        script = script.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _check_radii(results: list[dict], inputs: np.ndarray, bound: float) -> None:
    logits, _ = _logits_and_lower_bound(inputs)
    assert len(results) == len(inputs)
    for row, z in zip(results, logits, strict=True):
        y = int(np.argmax(z))
        margin = z[y] - np.max(np.delete(z, y))
        assert row["prediction"] == y
        assert math.isclose(row["margin"], margin, rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(row["radius"], margin / (math.sqrt(2) * bound), rel_tol=1e-4)


@pytest.fixture
def readme_server(tmp_path: Path) -> Iterator[int]:
    """``./scripts/serve`` (the README's first command) on a free port, data in a temp dir."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPCERT_")}
    env.update(PORT=str(port), LIPCERT_DATA_DIR=str(tmp_path / "data"))
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        ["./scripts/serve"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=2):
                    break
            except OSError:
                text = (tmp_path / "serve.log").read_text()
                assert proc.poll() is None, f"./scripts/serve exited:\n{text}"
                assert time.monotonic() < deadline, f"never live:\n{text}"
                time.sleep(0.5)
        # The first command tells the newcomer where the interactive docs are.
        assert f"http://127.0.0.1:{port}/docs" in (tmp_path / "serve.log").read_text()
        yield port
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.e2e
def test_http_tour(readme_server: int) -> None:
    (tour,) = blocks("tour")
    out = _run_block(tour, port=readme_server)
    job, certify, infer = _json_lines(out)
    assert job["status"] == "succeeded", json.dumps(job)
    result = job["result"]
    assert result["verified"] is True and result["method"] == "lipsdp-neuron"
    bound = result["lipschitz_bound"]
    inputs = np.array(json.loads(re.search(r'"inputs": (\[\[.*?\]\])', tour).group(1)))
    _, lower = _logits_and_lower_bound(inputs)
    assert lower <= bound <= _naive_bound() * (1 + 1e-6)
    assert certify["lipschitz_bound"] == pytest.approx(bound)
    _check_radii(certify["results"], inputs, bound)
    # the tour's labels are the network's own classes: everything correct
    assert [r["label"] for r in certify["results"]] == [r["prediction"] for r in certify["results"]]
    assert certify["accuracy"] == 1.0
    outputs = {o["name"]: o for o in infer["outputs"]}
    assert outputs["prediction"]["data"] == [certify["results"][0]["prediction"]]
    radius = outputs["certified_radius"]["data"][0]
    assert radius == pytest.approx(certify["results"][0]["radius"], rel=1e-5)
    assert infer["parameters"]["lipschitz_bound"] == pytest.approx(bound)


@pytest.mark.e2e
def test_cli_commands() -> None:
    (cli,) = blocks("cli")
    docs = _json_lines(_run_block(cli))
    bound_doc, verify_doc, certify_doc, local_doc, train_doc, sandwich_doc = docs
    assert bound_doc["verified"] is True and bound_doc["method"] == "lipsdp-neuron"
    assert bound_doc["solve_time_s"] >= 0
    bound = bound_doc["lipschitz_bound"]
    example = _example_module()
    rng = np.random.default_rng(example.SEED)
    example.build_mlp(rng)
    inputs = example.example_inputs(rng, 8).astype(np.float64)
    _, lower = _logits_and_lower_bound(inputs)
    assert lower <= bound <= _naive_bound() * (1 + 1e-6)
    # verify re-checks the saved certificate and finds the same bound
    assert verify_doc["verified"] is True
    assert verify_doc["lipschitz_bound"] == pytest.approx(bound, rel=1e-12)
    # certify: radius = margin / (sqrt(2) L) with a verified L
    used = certify_doc["bound"]
    assert used["verified"] is True
    assert lower <= used["lipschitz_bound"] <= _naive_bound() * (1 + 1e-6)
    _check_radii(certify_doc["results"], inputs, used["lipschitz_bound"])
    # certify --mode local: per-input radii, floored by the same global radius
    assert local_doc["mode"] == "local" and local_doc["bound"]["verified"] is True
    for row, glob in zip(local_doc["results"], certify_doc["results"], strict=True):
        assert row["prediction"] == glob["prediction"]
        assert row["global_radius"] == pytest.approx(glob["radius"], rel=1e-9, abs=1e-15)
        assert row["radius"] >= row["global_radius"]
    # train: an LBDN with gamma = 2, whose closed form the sandwich check confirms
    assert train_doc["gamma"] == 2.0 and train_doc["closed_form_confirmed"] is True
    assert sandwich_doc["method"] == "sandwich" and sandwich_doc["verified"] is True
    assert sandwich_doc["lipschitz_bound"] <= 2.0 * (1 + 1e-9)
    assert sandwich_doc["lipschitz_bound"] == pytest.approx(train_doc["lipschitz_bound"])
    assert sandwich_doc["lower_bound"] <= sandwich_doc["lipschitz_bound"]
