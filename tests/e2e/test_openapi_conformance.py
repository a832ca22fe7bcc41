"""The OpenAPI document matches the server: schemathesis, every check, against a real
``lipcert serve`` (uvicorn) process with an API key and a real model with a verified bound.

Every operation is fuzzed (examples, coverage, fuzzing and stateful phases, a bounded number of
examples per operation, fixed seed); the run fails on any finding: an undocumented status or
content type, a body that does not match its declared schema, a schema-valid request refused
or a schema-violating one accepted, a missing ``Allow`` on 405, auth not enforced, a 5xx.

What JSON Schema cannot say is stated below, per operation, and nowhere else:
* a model upload must also *parse* (ONNX, safetensors, .mat): random bytes are schema-valid
  and refused with 422;
* inputs must fit the model's input shape, and a bound method must apply to the network
  (sandwich needs a sandwich net): refused with 422 (/v1) or 400 (/v2, the protocol's status);
* ``DELETE /v1/jobs/{id}`` cancels a job and keeps it readable (the ``use_after_free`` check
  expects it gone), and ``DELETE /v1/models/{id}`` is pointed at an unknown id so that the
  model the other operations use stays (deleting is tested in tests/service).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.test_server import Server
from tests.service.onnx_nets import mlp_onnx

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "conformance-key"
EXAMPLES = 6

CONFIG = """
[[operations]]
include-name = "POST /v1/models"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "401", "404", "409", "422", "429", "5xx",
]

[[operations]]
include-name = "POST /v1/models/{{model_id}}/bounds"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "401", "404", "409", "422", "429", "5xx",
]

[[operations]]
include-name = "DELETE /v1/models/{{model_id}}"
parameters = {{ model_id = "0000000000000000" }}

[[operations]]
include-name = [
    "GET /v1/models/{{model_id}}",
    "GET /v1/models/{{model_id}}/bounds",
    "GET /v2/models/{{model_id}}",
    "GET /v2/models/{{model_id}}/ready",
    "GET /v2/models/{{model_id}}/versions/{{model_version}}",
    "GET /v2/models/{{model_id}}/versions/{{model_version}}/ready",
]
parameters = {{ model_id = "{mid}", model_version = "1" }}

[[operations]]
include-name = [
    "POST /v1/models/{{model_id}}/certify",
    "POST /v1/models/{{model_id}}/certifications",
    "POST /v2/models/{{model_id}}/infer",
    "POST /v2/models/{{model_id}}/versions/{{model_version}}/infer",
]
parameters = {{ model_id = "{mid}", model_version = "1" }}
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "404", "409", "422", "429", "5xx",
]
"""


@pytest.fixture
def server_with_model(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    srv = Server(tmp_path / "data", tmp_path / "server.log", env={"LIPCERT_API_KEY": KEY})
    srv.start()
    try:
        rng = np.random.default_rng(5)
        onnx_bytes = mlp_onnx([rng.normal(size=(16, 12)) / 3, rng.normal(size=(4, 16)) / 4])
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}, timeout=60) as c:
            mid = c.post("/v1/models", files={"file": ("m.onnx", onnx_bytes)}).json()["id"]
            job = c.post(f"/v1/models/{mid}/bounds", json={"method": "naive"}).json()
            deadline = time.monotonic() + 120
            while c.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "the naive bound job did not succeed"
                time.sleep(0.2)
        yield srv, mid
    finally:
        srv.stop()


def test_schemathesis_finds_no_conformance_error(
    server_with_model: tuple[Server, str], tmp_path: Path
) -> None:
    srv, mid = server_with_model
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(mid=mid))
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(config),
        "run",
        f"{srv.url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "use_after_free",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--header",
        f"X-API-Key: {KEY}",
        "--no-color",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", out)  # every operation was tested
    assert selected and selected[1] == selected[2] and int(selected[1]) >= 20, out[-3000:]
    assert srv.alive()
