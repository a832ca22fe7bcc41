"""Service test fixtures: real ONNX files built with onnx.helper, an app on a temp data dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.documents import StoredBound
from service.settings import Settings
from tests.service.onnx_nets import lipsdp_weights, mlp_onnx, norm_product


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory: a started TestClient on a fresh data dir; ``**overrides`` go to Settings."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides.setdefault("device", "cpu")
        client = TestClient(create_app(Settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def rw_weights(fixtures_dir: Path) -> list[np.ndarray]:
    return lipsdp_weights(fixtures_dir)


@pytest.fixture
def rw_onnx(rw_weights: list[np.ndarray]) -> bytes:
    return mlp_onnx(rw_weights)


@pytest.fixture
def model(client: TestClient, rw_onnx: bytes, rw_weights: list[np.ndarray]) -> tuple[str, float]:
    """(id, L): random_weights uploaded, with a naive (product of norms) bound stored as
    verified (job id ``job-naive``)."""
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    lip = norm_product([w.astype(np.float32) for w in rw_weights])
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "job-naive"}
        ),
    )
    return str(mid), lip
