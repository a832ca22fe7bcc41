"""schemathesis over the app's OpenAPI schema (in-process ASGI): no generated request may
cause a 5xx, and every error response is problem+json (under /v2 the Open Inference
Protocol's ``{"error": ...}``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.app import create_app
from service.documents import StoredBound
from service.settings import Settings
from tests.service.onnx_nets import lipsdp_weights, mlp_onnx

FUZZ = settings(
    max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


def test_no_server_errors(tmp_path: Path, fixtures_dir: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, device="cpu", max_upload_mb=1.0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the lifespan
    weights = lipsdp_weights(fixtures_dir)
    rec = app.state.storage.save_model(mlp_onnx(weights), "rw.onnx")
    lip = float(np.prod([np.linalg.norm(w, 2) for w in weights]))
    app.state.storage.save_bound(
        rec.id, StoredBound.from_json({"lipschitz_bound": lip, "method": "naive", "verified": True})
    )
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(operation.label)

        @given(case=operation.as_strategy())
        @FUZZ
        def check(case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400 and case.path.startswith("/v2"):
                assert response.headers["content-type"][0] == "application/json"
                assert set(response.json()) >= {"error"}  # the protocol's error shape
            elif response.status_code >= 400:
                assert response.headers["content-type"][0].startswith("application/problem+json")

        check()
    assert "POST /v1/models/{model_id}/certify" in seen and "POST /v1/models" in seen
