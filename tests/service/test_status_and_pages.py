"""``GET /v1/status``, the runners' ``active_jobs`` and the HTML pages (dashboard, docs) as
plain HTTP: every asset a page names is served by the app itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from service.documents import JobError
from service.jobs.base import JobRecord, JobSpec
from service.jobs.store import JobStore
from service.routes.status import CERTIFY_PATH, certify_modes

KEY = "status-test-key"


def test_status_reports_server_jobs_and_modes(client: TestClient) -> None:
    s = client.get("/v1/status").json()
    assert s["version"] == client.app.version
    assert s["ready"] is True and s["not_ready"] == []
    assert s["device"] == "cpu" and s["dtype"] in ("float32", "float64")
    assert s["solver_device"] == "cpu"
    assert s["runner"] == "local"
    assert s["jobs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert s["active_jobs"] == [] and s["inference_queue"] == 0
    assert s["api_key_required"] is False
    assert "global" in s["certify_modes"]
    assert "structured" in s["solvers"] and "scs" in s["solvers"]


def test_status_lists_active_jobs(client: TestClient) -> None:
    store: JobStore = client.app.state.runner.store
    queued = JobRecord(id="a" * 32, spec=JobSpec("m1", "lipsdp-neuron"))
    done = JobRecord(id="b" * 32, spec=JobSpec("m2", "naive"), status="succeeded")
    store.insert(queued)
    store.insert(done)
    s = client.get("/v1/status").json()
    assert s["jobs"]["queued"] == 1 and s["jobs"]["succeeded"] == 1
    assert [j["job_id"] for j in s["active_jobs"]] == [queued.id]
    assert s["active_jobs"][0]["model_id"] == "m1"
    assert s["active_jobs"][0]["method"] == "lipsdp-neuron"


def test_job_store_active_is_oldest_first_and_limited(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    recs = [
        JobRecord(id=f"{k:032x}", spec=JobSpec(f"m{k}"), created_at=f"2026-01-0{k + 1}T00:00:00Z")
        for k in range(4)
    ]
    for rec in reversed(recs):
        store.insert(rec)
    store.finish(recs[1].id, "cancelled", error=JobError("cancelled", "x"))
    assert [r.id for r in store.active()] == [recs[0].id, recs[2].id, recs[3].id]
    assert [r.id for r in store.active(limit=2)] == [recs[0].id, recs[2].id]


def test_status_needs_the_key_when_one_is_set(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key=KEY)
    r = c.get("/v1/status")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    ok = c.get("/v1/status", headers={"X-API-Key": KEY})
    assert ok.status_code == 200 and ok.json()["api_key_required"] is True


def test_certify_modes_follow_the_certify_operation() -> None:
    """The modes are read from the OpenAPI document: a ``mode`` query parameter with an enum
    (or a JSON body field) is what the dashboard's mode selector offers."""
    app = FastAPI()

    @app.post(CERTIFY_PATH)
    def certify(model_id: str, mode: Literal["global", "local"] = Query("global")) -> None: ...

    class Req:
        app: FastAPI

    req = Req()
    req.app = app
    assert certify_modes(req) == ["global", "local"]  # type: ignore[arg-type]
    req.app = FastAPI()
    assert certify_modes(req) == ["global"]  # type: ignore[arg-type]


ASSET = re.compile(r'(?:src|href)="([^"#]+)"')


def test_pages_are_public_and_every_asset_is_served_locally(
    make_client: Callable[..., TestClient],
) -> None:
    c = make_client(api_key=KEY)
    for page in ("/", "/docs", "/redoc"):
        r = c.get(page)
        assert r.status_code == 200, page
        assert r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assets = ASSET.findall(r.text)
        assert assets, page
        for url in assets:
            assert url.startswith("/"), (page, url)  # nothing from another host
            assert c.get(url).status_code == 200, (page, url)
    assert c.get("/openapi.json").status_code == 200


@pytest.mark.redis
def test_rq_runner_active_jobs(tmp_path: Path) -> None:
    from service.jobs.rq import RqRunner
    from service.storage import Storage
    from tests.redis_server import redis_server

    with redis_server(tmp_path) as url:
        runner = RqRunner(Storage(tmp_path / "data"), url)
        for k, job_id in enumerate(("b", "a", "c")):
            rec = JobRecord(id=job_id, spec=JobSpec(f"m{k}"), created_at=f"2026-01-0{3 - k}")
            runner.jobs.create(rec, model_sha256="0" * 64, timeout_s=5.0)
        assert runner.jobs.finish(
            "a", "cancelled", error=JobError("cancelled", ""), finished_at="t"
        )
        assert [r.id for r in runner.active_jobs()] == ["c", "b"]  # oldest first
        assert [r.id for r in runner.active_jobs(limit=1)] == ["c"]
