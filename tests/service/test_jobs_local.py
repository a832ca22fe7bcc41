"""Bound jobs through the app with the local runner: real solver processes, SQLite state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdp.certificate import Certificate, Lmi, verify_certificate
from sdp.importers import load_model
from service.app import create_app
from service.jobs.base import JobSpec
from service.settings import Settings
from tests.service.jobs_support import (
    LIPSDP_NEURON_RANDOM_WEIGHTS,
    LONG_SOLVE,
    big_random_net,
    ended,
    job_getter,
    pid_alive,
    post_bound,
    random_weights,
    solving,
    tiny_residual_onnx,
    upload,
    wait_for,
    wait_pid_gone,
)


def app_client(data_dir: Path) -> TestClient:
    settings = Settings(data_dir=data_dir, queue_url="", max_concurrent_jobs=1, job_timeout_s=600)
    return TestClient(create_app(settings))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with app_client(tmp_path / "data") as c:
        yield c


def test_runner_is_local(client: TestClient) -> None:
    assert client.app.state.runner.name == "local"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_lipsdp_neuron_random_weights_certified_stored_and_reused(
    client: TestClient, fixtures_dir: Path
) -> None:
    data = random_weights(fixtures_dir)
    model_id = upload(client, data, "random_weights.mat")
    job = post_bound(client, model_id, method="lipsdp-neuron")
    assert job["status"] in ("queued", "running")
    job = wait_for(job_getter(client, job["job_id"]), ended)
    assert job["status"] == "succeeded", job
    result = job["result"]
    value = result["lipschitz_bound"]
    # sound and tight: never below the published optimum, within 0.1% of it
    ref = LIPSDP_NEURON_RANDOM_WEIGHTS
    assert ref * (1 - 1e-5) <= value <= ref * 1.001
    assert result["verified"] is True
    assert result["method"] == "lipsdp-neuron"
    assert job["started_at"] and job["finished_at"] and job["progress"]

    # the stored certificate re-checks without a solver, and a tampered one does not
    net = load_model(data)
    cert = Certificate.from_json(json.dumps(result["certificate"]))
    assert cert.lipschitz_bound == pytest.approx(value, rel=1e-12)
    lmi = Lmi.from_chain(net.chain())
    assert verify_certificate(lmi, cert)
    smaller = Certificate(cert.rho * 0.99, cert.multipliers, cert.output_map)
    assert not verify_certificate(lmi, smaller)

    # an identical request reuses the succeeded job; a different one does not
    again = post_bound(client, model_id, method="lipsdp-neuron")
    assert again["job_id"] == job["job_id"] and again["reused"] is True
    assert again["status"] == "succeeded"
    other = post_bound(client, model_id, method="naive")
    assert other["job_id"] != job["job_id"]
    other = wait_for(job_getter(client, other["job_id"]), ended)
    assert other["status"] == "succeeded", other
    assert other["result"]["lipschitz_bound"] >= value  # LipSDP <= product of norms

    listed = client.get(f"/v1/models/{model_id}/bounds").json()
    by_job = {b["job_id"]: b for b in listed["bounds"]}
    assert by_job[job["job_id"]]["lipschitz_bound"] == value
    assert by_job[job["job_id"]]["certificate"]["rho"] == cert.rho
    assert listed["best"]["lipschitz_bound"] == value
    full = client.get(f"/v1/models/{model_id}/bounds", params={"full": "true"}).json()
    stored = {b["job_id"]: b for b in full["bounds"]}[job["job_id"]]["certificate"]
    assert stored["multipliers"] == result["certificate"]["multipliers"]


def test_identical_in_flight_request_shares_the_job(client: TestClient) -> None:
    model_id = upload(client, big_random_net(), "big.mat")
    first = post_bound(client, model_id, **LONG_SOLVE)
    second = post_bound(client, model_id, **LONG_SOLVE)
    assert second["job_id"] == first["job_id"] and second["reused"] is True
    different = post_bound(client, model_id, **LONG_SOLVE, pairwise=True)
    assert different["job_id"] != first["job_id"]
    # another time limit: not joined (it would time out earlier or wait longer than asked)
    limited = post_bound(client, model_id, **LONG_SOLVE, timeout_s=500)
    assert limited["job_id"] != first["job_id"] and limited["reused"] is False
    for job_id in (first["job_id"], different["job_id"], limited["job_id"]):
        assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_cancel_kills_the_solver_process(client: TestClient) -> None:
    model_id = upload(client, big_random_net(), "big.mat")
    job = post_bound(client, model_id, **LONG_SOLVE)
    job = wait_for(job_getter(client, job["job_id"]), solving, timeout_s=120)
    assert job["status"] == "running", job
    pid = job["worker"]["pid"]
    assert pid_alive(pid)
    r = client.delete(f"/v1/jobs/{job['job_id']}")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert not pid_alive(pid)  # killed and reaped before DELETE answered
    assert wait_for(job_getter(client, job["job_id"]), ended)["status"] == "cancelled"
    # cancelling again is harmless; a cancelled job is not reused
    assert client.delete(f"/v1/jobs/{job['job_id']}").json()["status"] == "cancelled"
    fresh = post_bound(client, model_id, **LONG_SOLVE)
    assert fresh["job_id"] != job["job_id"]
    client.delete(f"/v1/jobs/{fresh['job_id']}")


def test_timeout_fails_the_job_and_kills_the_solver(client: TestClient) -> None:
    model_id = upload(client, big_random_net(), "big.mat")
    job = post_bound(client, model_id, **LONG_SOLVE, timeout_s=1.0)
    job = wait_for(job_getter(client, job["job_id"]), ended, timeout_s=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "timeout"
    assert "timeout" in job["error"]["detail"]
    assert wait_pid_gone(job["worker"]["pid"])


def test_event_stream_delivers_progress_and_ends(client: TestClient, fixtures_dir: Path) -> None:
    model_id = upload(client, random_weights(fixtures_dir), "random_weights.mat")
    job = post_bound(client, model_id, method="naive")
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job['job_id']}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[len("data: ") :])))
    names = [n for n, _ in events]
    assert names[-1] == "end"  # the stream closed by itself after the terminal event
    assert names.count("end") == 1
    assert "status" in names and "progress" in names
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["result"]["verified"] is True
    statuses = [d["status"] for n, d in events if n == "status"]
    assert statuses[-1] == "succeeded"
    assert len(statuses) == len(set(statuses))  # one event per change
    metrics = client.get("/metrics").text
    assert 'lipcert_jobs{status="succeeded"} 1.0' in metrics
    assert 'lipcert_bound_solve_seconds_count{method="naive"}' in metrics


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"method": "lipsdp-network"}, 422, "unsupported-method"),
        ({"method": "bogus"}, 422, "unsupported-method"),
        ({"method": "naive", "solver": "no-such-solver"}, 422, "solver-unknown"),
        ({"method": "naive", "timeout_s": -1}, 422, "validation-error"),
        ({"method": "naive", "extra": 1}, 422, "validation-error"),
    ],
)
def test_bad_requests_are_refused_before_queuing(
    client: TestClient, fixtures_dir: Path, body: dict[str, Any], status: int, code: str
) -> None:
    model_id = upload(client, random_weights(fixtures_dir), "random_weights.mat")
    r = client.post(f"/v1/models/{model_id}/bounds", json=body)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code
    if body.get("method") == "lipsdp-network":
        assert "sound" in r.json()["detail"]
    store = client.app.state.runner.store  # type: ignore[attr-defined]
    assert store.find_reusable(JobSpec(model_id, str(body["method"])).dedupe_key()) == []


def test_methods_the_network_cannot_take_are_refused_at_once(
    client: TestClient, fixtures_dir: Path
) -> None:
    plain_id = upload(client, random_weights(fixtures_dir), "random_weights.mat")
    res_id = upload(client, tiny_residual_onnx(), "tiny_residual.onnx")
    for model_id, body in [
        (plain_id, {"method": "sandwich"}),
        (res_id, {"method": "lipsdp-neuron"}),
        (res_id, {"method": "naive", "pairwise": True}),
    ]:
        r = client.post(f"/v1/models/{model_id}/bounds", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["code"] == "method-not-applicable"
    # the residual net still gets its compositional bound
    job = post_bound(client, res_id, method="naive")
    job = wait_for(job_getter(client, job["job_id"]), ended)
    assert job["status"] == "succeeded", job
    assert job["result"]["method"] == "naive-compositional"
    assert job["result"]["lipschitz_bound"] >= job["result"]["lower_bound"] > 0


def test_unknown_model_and_job_are_404(client: TestClient) -> None:
    r = client.post("/v1/models/0123456789abcdef/bounds", json={"method": "naive"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/models/0123456789abcdef/bounds").status_code == 404
    for method, path in [
        ("GET", "/v1/jobs/nope"),
        ("DELETE", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/events"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, path
        assert r.json()["code"] == "job-not-found"


@pytest.mark.slow
def test_graceful_restart_keeps_bounds_and_reuses_results(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    with app_client(data_dir) as c1:
        model_id = upload(c1, random_weights(fixtures_dir), "random_weights.mat")
        done = post_bound(c1, model_id, method="naive")
        done = wait_for(job_getter(c1, done["job_id"]), ended)
        assert done["status"] == "succeeded"
    with app_client(data_dir) as c2:
        listed = c2.get(f"/v1/models/{model_id}/bounds").json()["bounds"]
        assert [b["job_id"] for b in listed if b.get("job_id")] == [done["job_id"]]
        assert job_getter(c2, done["job_id"])()["status"] == "succeeded"
        again = post_bound(c2, model_id, method="naive")
        assert again["job_id"] == done["job_id"] and again["reused"]


def test_a_job_whose_model_is_deleted_before_it_stores_fails(
    client: TestClient, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is deleted at the last moment (just before the result is stored): the job
    fails with ``model-deleted``, nothing is stored, and the same bytes uploaded again start
    from scratch."""
    data = random_weights(fixtures_dir)
    model_id = upload(client, data, "rw.mat")
    storage = client.app.state.runner.storage  # type: ignore[attr-defined]
    save = storage.save_job_bound

    def delete_then_save(mid: str, doc: dict[str, Any], guard: Any) -> str:
        storage.delete_model(mid)
        return str(save(mid, doc, guard))

    monkeypatch.setattr(storage, "save_job_bound", delete_then_save)
    job = post_bound(client, model_id, method="lipsdp-neuron")
    job = wait_for(job_getter(client, job["job_id"]), ended, timeout_s=120)
    assert job["status"] == "failed" and job["error"]["code"] == "model-deleted", job
    monkeypatch.undo()
    assert upload(client, data, "rw.mat") == model_id
    assert client.get(f"/v1/models/{model_id}/bounds").json()["bounds"] == []
    assert post_bound(client, model_id, method="lipsdp-neuron")["job_id"] != job["job_id"]


def test_deleting_a_model_cancels_its_running_job(client: TestClient) -> None:
    model_id = upload(client, big_random_net(), "big.mat")
    job = post_bound(client, model_id, **LONG_SOLVE)
    job = wait_for(job_getter(client, job["job_id"]), solving, timeout_s=120)
    pid = job["worker"]["pid"]
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    job = wait_for(job_getter(client, job["job_id"]), ended)
    assert job["status"] == "cancelled" and job["error"]["code"] == "model-deleted", job
    assert wait_pid_gone(pid)
