"""Defects of the model store and the local job runner (issue 17 item 6), each on real
SQLite files, the real upload checker and real solver processes:

- a KeyError raised inside a job is not reported as ``model-not-found``;
- an id collision (other bytes, same 16-hex id) is refused, never answered with the other
  model's record;
- stale models are re-imported under the upload checker's limits, and one that no longer
  imports is marked ``unimportable`` with the reason instead of being kept silently;
- ``LocalRunner`` forgets cancelled job ids once they are done;
- a bound is stored only together with its job's ``succeeded``, while the job still runs
  and is the runner's own.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sdp.importers import IMPORTER_VERSION
from service.app import create_app
from service.documents import JobError, StoredBound
from service.jobs.base import JobRecord, JobSpec
from service.jobs.local import LocalRunner
from service.jobs.store import JobStore, Owner
from service.jobs.tasks import error_document, load_network
from service.parsing import ModelChecker
from service.settings import Settings
from service.storage import ModelIdCollision, ModelNotFound, Storage
from tests.service.jobs_support import (
    LONG_SOLVE,
    big_random_net,
    ended,
    job_getter,
    post_bound,
    random_weights,
    solving,
    wait_for,
)
from tests.service.onnx_nets import mlp_onnx


def test_only_the_stores_own_miss_is_model_not_found(tmp_path: Path) -> None:
    assert error_document(KeyError("weights")).code == "internal-error"
    assert error_document(ModelNotFound("abc")).code == "model-not-found"
    Storage(tmp_path)
    with pytest.raises(ModelNotFound) as exc:
        load_network(("storage", str(tmp_path), "0123456789abcdef"))
    assert error_document(exc.value).code == "model-not-found"


def _squat(storage: Storage, data: bytes) -> str:
    """Record a different file under the id ``data`` would get (a 64-bit prefix
    collision cannot be computed; the row is what such a file would leave)."""
    sha = hashlib.sha256(data).hexdigest()
    other = "f" * 64 if not sha.startswith("f") else "e" * 64
    with sqlite3.connect(storage.db_path) as db:
        db.execute(
            "INSERT INTO models (id, sha256, filename, format, kind, input_shape, output_shape,"
            " layers, parameters, size_bytes, created_at, importer_version)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (sha[:16], other, "other.onnx", "onnx", "feedforward", "[2]", "[2]", 1, 1, 1, "t", 1),
        )
    return other


def test_an_id_collision_is_refused_not_answered_with_the_other_record(
    tmp_path: Path, rw_weights: list
) -> None:
    data = mlp_onnx(rw_weights)
    storage = Storage(tmp_path)
    other = _squat(storage, data)
    with pytest.raises(ModelIdCollision):
        storage.save_model(data, "mine.onnx")
    assert [m.sha256 for m in storage.list_models()] == [other]  # untouched
    assert list((tmp_path / "models").iterdir()) == []  # nothing left behind

    settings = Settings(data_dir=tmp_path, queue_url="")
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/models", files={"file": ("mine.onnx", data)})
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "model-id-collision"
    assert r.headers["content-type"].startswith("application/problem+json")


def test_stale_models_are_reimported_under_the_upload_limits_and_marked(
    tmp_path: Path, rw_weights: list
) -> None:
    good = mlp_onnx(rw_weights)
    storage = Storage(tmp_path)
    good_id = storage.save_model(good, "good.onnx").id
    bad_bytes = b"\x08\x07" + b"not a model" * 10
    bad_sha = hashlib.sha256(bad_bytes).hexdigest()
    (tmp_path / "models" / f"{bad_sha}.bin").write_bytes(bad_bytes)
    gone_sha = "ab" * 32
    with sqlite3.connect(storage.db_path) as db:  # as an older importer version left them
        for sha, name in ((bad_sha, "bad.onnx"), (gone_sha, "gone.onnx")):
            db.execute(
                "INSERT INTO models (id, sha256, filename, format, kind, input_shape,"
                " output_shape, layers, parameters, size_bytes, created_at, network_hash,"
                " importer_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sha[:16], sha, name, "onnx", "feedforward", "[2]", "[2]", 1, 1, 1, "t", "h", 0),
            )
            db.execute(
                "INSERT INTO bounds (model_id, method, value, verified, created_at, result,"
                " network_hash) VALUES (?,?,?,?,?,?,?)",
                (sha[:16], "naive", 1.0, 1, "t", '{"lipschitz_bound": 1.0}', "h"),
            )
    assert set(storage.stale_models()) == {bad_sha[:16], gone_sha[:16]}

    # the app's start-up does it, through the checker process (time and memory limits)
    settings = Settings(data_dir=tmp_path, queue_url="")
    with TestClient(create_app(settings)) as client:
        bad = client.get(f"/v1/models/{bad_sha[:16]}").json()
        gone = client.get(f"/v1/models/{gone_sha[:16]}").json()
        ok = client.get(f"/v1/models/{good_id}").json()
        bounds = client.get(f"/v1/models/{bad_sha[:16]}/bounds").json()
    assert bad["status"] == "unimportable" and bad["problem"]["code"]
    assert bad["problem"]["code"] != "ok" and bad["problem"]["detail"]
    assert gone["status"] == "unimportable"
    assert gone["problem"]["code"] == "model-file-missing"
    assert ok["status"] == "ok" and ok["problem"] is None
    assert bounds["bounds"] == [] and bounds["best"] is None  # no longer trusted
    assert Storage(tmp_path).stale_models() == []  # marked with the current version
    with sqlite3.connect(storage.db_path) as db:
        versions = {v for (v,) in db.execute("SELECT importer_version FROM models")}
    assert versions == {IMPORTER_VERSION}


def test_a_checker_refusal_marks_instead_of_importing_in_process(
    tmp_path: Path, rw_weights: list
) -> None:
    """A parse that the checker stops (here: its time limit) marks the model; it is never
    parsed in the API process."""
    storage = Storage(tmp_path)
    mid = storage.save_model(mlp_onnx(rw_weights), "m.onnx").id
    with sqlite3.connect(storage.db_path) as db:
        db.execute("UPDATE models SET importer_version = 0")
    outcome = storage.reimport_stale_models(ModelChecker(1e-6).parse)
    assert outcome == {mid: "parse-timeout"}
    rec = storage.get_model(mid)
    assert rec is not None and rec.status == "unimportable"
    assert rec.problem is not None and rec.problem["code"] == "parse-timeout"


def test_an_unreadable_stored_file_is_marked_and_start_up_goes_on(
    tmp_path: Path, rw_weights: list
) -> None:
    """Another OSError than a missing file (here: a directory where the file should be)
    marks the model instead of stopping the re-import of the others (review)."""
    storage = Storage(tmp_path)
    ids = [
        storage.save_model(mlp_onnx(w), f"m{i}.onnx").id
        for i, w in enumerate((rw_weights, [np.asarray(a) * 2.0 for a in rw_weights]))
    ]
    broken = storage.get_model(ids[0])
    assert broken is not None
    path = tmp_path / "models" / f"{broken.sha256}.bin"
    path.unlink()
    path.mkdir()  # reading it raises IsADirectoryError
    with sqlite3.connect(storage.db_path) as db:
        db.execute("UPDATE models SET importer_version = 0")
    outcome = storage.reimport_stale_models(ModelChecker(60.0).parse)
    assert outcome == {ids[0]: "model-file-unreadable", ids[1]: "ok"}
    rec = storage.get_model(ids[0])
    assert rec is not None and rec.status == "unimportable"
    assert rec.problem is not None and "IsADirectoryError" in rec.problem["detail"]


def test_a_bound_is_stored_only_with_its_running_jobs_success(
    tmp_path: Path, rw_weights: list
) -> None:
    storage = Storage(tmp_path)
    mid = storage.save_model(mlp_onnx(rw_weights)).id
    store = JobStore(tmp_path / "jobs.sqlite")
    me, other = Owner.this_process("me"), Owner.this_process("other")
    store.register(me)
    doc = {"lipschitz_bound": 3.0, "method": "naive", "verified": True}
    for job_id in ("done", "cancelled", "theirs"):
        store.insert(
            JobRecord(id=job_id, spec=JobSpec(mid)), owner="other" if job_id == "theirs" else "me"
        )
        store.mark_running(job_id, {})
    store.finish("cancelled", "cancelled", error=JobError("cancelled", ""))

    def save(job_id: str) -> str:
        guard = store.success_guard(job_id, me.id, {**doc, "job_id": job_id})
        return storage.save_job_bound(mid, StoredBound.from_json({**doc, "job_id": job_id}), guard)

    assert save("cancelled") == "job-ended"
    assert save("theirs") == "job-ended"  # not ours: nothing stored, its status unchanged
    assert store.get("theirs").status == "running"  # type: ignore[union-attr]
    assert save("done") == "stored"
    assert store.get("done").status == "succeeded"  # type: ignore[union-attr]
    assert save("done") == "job-ended"  # once
    assert [b.job_id for b in storage.list_bounds(mid)] == ["done"]
    # only dead owners' jobs are failed: "other" never registered a live process
    store.register(other)
    assert store.fail_orphaned(30.0, "server-restarted", "x") == 0
    assert store.get("theirs").status == "running"  # type: ignore[union-attr]


def test_cancelled_ids_do_not_accumulate(tmp_path: Path, fixtures_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path, queue_url="", max_concurrent_jobs=1)
    with TestClient(create_app(settings)) as client:
        runner: LocalRunner = client.app.state.runner  # type: ignore[attr-defined]
        storage = runner.storage
        big = storage.save_model(big_random_net(), "big.mat").id
        small = storage.save_model(random_weights(fixtures_dir), "rw.mat").id
        running = post_bound(client, big, **LONG_SOLVE)
        queued = post_bound(client, small, method="naive")
        wait_for(job_getter(client, running["job_id"]), solving, timeout_s=120)
        for job in (queued, running):  # a queued and a running job
            assert client.delete(f"/v1/jobs/{job['job_id']}").json()["status"] == "cancelled"
        for job in (queued, running):
            wait_for(job_getter(client, job["job_id"]), ended)
        done = post_bound(client, small, method="naive")  # the pool is free again
        assert wait_for(job_getter(client, done["job_id"]), ended)["status"] == "succeeded"
        deadline = time.monotonic() + 10  # the supervising thread tidies up just after
        while runner._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner._cancelled == set() and runner._pending == set()
        assert client.delete(f"/v1/jobs/{done['job_id']}").json()["status"] == "succeeded"
        assert runner._cancelled == set()  # cancelling an ended job adds nothing


def test_stray_upload_files_are_swept_when_the_store_opens(
    tmp_path: Path, rw_weights: list
) -> None:
    storage = Storage(tmp_path)
    kept = storage.save_model(mlp_onnx(rw_weights)).sha256
    models = tmp_path / "models"
    old, young = models / ".upload-abc", models / ("c" * 64 + ".bin")
    stray = models / ("d" * 64 + ".bin")
    for path in (old, young, stray):
        path.write_bytes(b"x")
    for path in (old, stray):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    Storage(tmp_path)
    assert sorted(p.name for p in models.iterdir()) == sorted([f"{kept}.bin", young.name])
