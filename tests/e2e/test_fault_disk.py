"""A full disk, for real: the data dir on an 8 MiB tmpfs, a real ``lipcert serve``.

Uploads and bound requests answer 507 ``storage-full`` (never 500), DELETE still works and
frees space, the server starts on a full disk (live, not ready, with the reason), and
afterwards both databases are intact with no orphan or temporary file. Needs root to
mount the tmpfs; skipped (with the reason) where mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.diskspace import StorageFull
from service.documents import JobError
from service.jobs.base import JobRecord, JobSpec
from service.jobs.local import LocalRunner
from service.jobs.store import JobStore
from service.storage import Storage
from tests.serve_process import Calls, serving, wait_job
from tests.service.jobs_support import (
    big_random_net,
    ended,
    random_weights,
    solving,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

SETTINGS = {"LIPCERT_MIN_FREE_MB": "0.5", "LIPCERT_RESERVE_MB": "1"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at ``tmp_path/disk`` (unmounted afterwards)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (ENOSPC), like another program would."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return
    try:
        for size in (65536, 4096, 512):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _consistent(data_dir: Path) -> list[str]:
    """Model ids; asserts both databases pass integrity_check and files match records."""
    for name in ("lipcert.sqlite3", "jobs.sqlite"):
        with sqlite3.connect(data_dir / name) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with sqlite3.connect(data_dir / "lipcert.sqlite3") as db:
        rows = db.execute("SELECT id, sha256 FROM models").fetchall()
        orphan_bounds = db.execute(
            "SELECT COUNT(*) FROM bounds WHERE model_id NOT IN (SELECT id FROM models)"
        ).fetchone()[0]
    assert orphan_bounds == 0
    files = sorted(p.name for p in (data_dir / "models").iterdir())
    assert files == sorted(f"{sha}.bin" for _, sha in rows), "orphan or missing model files"
    return [mid for mid, _ in rows]


def test_full_disk_gives_507_delete_frees_and_start_works(
    small_disk: Path, tmp_path: Path, fixtures_dir: Path
) -> None:
    data_dir = small_disk / "data"
    log = tmp_path / "serve.log"
    filler = small_disk / "filler.bin"
    with serving(data_dir, log, **SETTINGS) as srv:
        http = Calls(srv.url)
        rw = http.post("/v1/models", files={"file": ("rw.mat", random_weights(fixtures_dir))})
        assert rw.status_code == 201, rw.text
        rw_id = rw.json()["id"]
        job = http.post(f"/v1/models/{rw_id}/bounds", json={"method": "naive"}).json()
        assert wait_job(http, job["job_id"])["status"] == "succeeded"

        # uploads until the disk is full: 201s, then 507 storage-full, never a 500
        uploaded, refused = [], None
        for seed in range(200):
            body = big_random_net((20, 100, 100, 10), seed=seed)
            r = http.post("/v1/models", files={"file": (f"n{seed}.mat", body)})
            if r.status_code == 201:
                uploaded.append(r.json()["id"])
                continue
            refused = r
            break
        assert refused is not None and uploaded, "the disk never filled"
        assert refused.status_code == 507, refused.text
        assert refused.json()["code"] == "storage-full"
        assert refused.headers["content-type"].startswith("application/problem+json")

        # something else fills the rest: nothing at all is free now
        fill(filler)
        r = http.post(f"/v1/models/{uploaded[0]}/bounds", json={"method": "naive"})
        assert r.status_code == 507 and r.json()["code"] == "storage-full", r.text
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "storage-full" in [x["code"] for x in ready.json()["reasons"]]
        assert http.get("/v2/health/live").status_code == 200
        assert http.get(f"/v1/models/{rw_id}").status_code == 200  # reads still work
        assert http.get(f"/v1/models/{rw_id}/bounds").json()["best"] is not None

        # DELETE works on the full disk (the reserve is given up for it) and frees space
        for mid in uploaded[:3]:
            r = http.delete(f"/v1/models/{mid}")
            assert r.status_code == 204, r.text
            assert http.get(f"/v1/models/{mid}").status_code == 404
    fill(filler)  # full again, the server stopped (its WAL files closed and removed)
    # start on the full disk: live, not ready, with the reason; DELETE works
    with serving(data_dir, log, **SETTINGS) as srv:
        http2 = Calls(srv.url)
        ready = http2.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "storage-full" in [x["code"] for x in ready.json()["reasons"]]
        assert http2.get("/v2/health/live").status_code == 200
        assert http2.delete(f"/v1/models/{uploaded[3]}").status_code == 204
        listed = http2.get("/v1/models").json()["models"]
        assert uploaded[3] not in [m["id"] for m in listed]

        # space comes back: ready again, uploads and jobs work
        filler.unlink()
        assert http2.get("/v2/health/ready").status_code == 200
        r = http2.post("/v1/models", files={"file": ("again.mat", big_random_net(seed=1000))})
        assert r.status_code == 201, r.text
        job = http2.post(f"/v1/models/{r.json()['id']}/bounds", json={"method": "naive"}).json()
        assert wait_job(http2, job["job_id"])["status"] == "succeeded"
        http.seen += http2.seen
    server_errors = [c for c in http.seen if c[2] >= 500 and c[2] not in (503, 507)]
    assert server_errors == [] and srv.server_errors() == []
    assert http.statuses(503) == [("GET", "/v2/health/ready", 503)] * 2  # readiness only
    ids = _consistent(data_dir)
    assert rw_id in ids and not set(uploaded[:4]) & set(ids)
    assert not [p for p in (data_dir / "models").iterdir() if p.name.startswith(".")]


def test_a_write_that_hits_the_full_disk_leaves_nothing_behind(small_disk: Path) -> None:
    """Without the free-space floor the write itself fails (ENOSPC): StorageFull, and
    neither a temp file nor a model file nor a record remains."""
    storage = Storage(small_disk / "data")  # no floor, no reserve
    fill(small_disk / "filler.bin")
    with pytest.raises(StorageFull):
        storage.save_model(big_random_net(seed=5), "late.mat")
    assert list((small_disk / "data" / "models").iterdir()) == []
    (small_disk / "filler.bin").unlink()
    assert storage.list_models() == []


def test_a_job_that_ends_on_a_full_disk_is_failed_once_there_is_room(small_disk: Path) -> None:
    """A solve that ends (here: its time limit) while the disk is full cannot record its end;
    once space is back the job must end ``failed``, not stay ``running`` for good (where an
    identical request would reuse it forever)."""
    data_dir = small_disk / "data"
    storage = Storage(data_dir)
    model_id = storage.save_model(big_random_net(), "big.mat").id
    runner = LocalRunner(storage, data_dir, lease_s=0.6)
    runner.start()
    filler = small_disk / "filler.bin"
    try:
        job = runner.submit(JobSpec(model_id, "lipsdp-neuron", solver="scs", timeout_s=12.0))
        running = wait_for(lambda: runner.get(job.id).to_dict(), solving)  # type: ignore[union-attr]
        fill(filler)
        assert running["status"] == "running", (running["error"], running["progress"])
        wait_for(lambda: runner._procs, lambda procs: not procs, timeout_s=30)  # solve ended
        time.sleep(0.5)  # its end was not recorded: the store is full
        filler.unlink()
        ended_job = wait_for(lambda: runner.get(job.id).to_dict(), ended, timeout_s=10)  # type: ignore[union-attr]
    finally:
        runner.stop()
    assert ended_job["status"] == "failed", ended_job
    assert storage.list_bounds(model_id) == []


@pytest.mark.parametrize("reserve_mb", [1, 0])
def test_a_job_can_be_cancelled_on_a_full_disk(small_disk: Path, reserve_mb: int) -> None:
    """DELETE /v1/jobs/{id} answered 507 on a full disk (review). With a reserve file, it is
    given up for the write; without one, the job is cancelled all the same (its solver
    killed, answered and read back as cancelled) and the store says so once there is room."""
    data_dir = small_disk / "data"
    storage = Storage(data_dir, reserve_bytes=reserve_mb << 20)
    model_id = storage.save_model(big_random_net(), "big.mat").id
    runner = LocalRunner(storage, data_dir, lease_s=0.6)
    runner.start()
    filler = small_disk / "filler.bin"
    try:
        job = runner.submit(JobSpec(model_id, "lipsdp-neuron", solver="scs", timeout_s=60.0))
        wait_for(lambda: runner.get(job.id).to_dict(), solving)  # type: ignore[union-attr]
        fill(filler)
        cancelled = runner.cancel(job.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.error == JobError("cancelled", "cancelled by request")
        wait_for(lambda: runner._procs, lambda procs: not procs, timeout_s=30)  # solver killed
        again = runner.get(job.id)
        assert again is not None and again.status == "cancelled"
        filler.unlink()
        stored = wait_for(lambda: runner.store.get(job.id).to_dict(), ended, timeout_s=10)  # type: ignore[union-attr]
    finally:
        runner.stop()
    assert stored["status"] == "cancelled" and stored["error"]["code"] == "cancelled"
    assert storage.list_bounds(model_id) == []


def test_jobs_stay_readable_on_a_full_disk(small_disk: Path) -> None:
    """Reading a job needs no new space: GET /v1/jobs/{id} answered 507 on a full disk
    because each read opened the first connection again, which must recreate the WAL index
    (``jobs.sqlite-shm``, 32 KiB)."""
    store = JobStore(small_disk / "data" / "jobs.sqlite")
    rec = JobRecord(id="j1", spec=JobSpec("m", "naive"))
    store.insert(rec)
    fill(small_disk / "filler.bin")
    for _ in range(3):
        got = store.get("j1")
        assert got is not None and got.status == "queued"
    assert store.status_counts()["queued"] == 1
    with pytest.raises(StorageFull):  # writes still need room
        store.insert(JobRecord(id="j2", spec=JobSpec("m", "naive")))
    (small_disk / "filler.bin").unlink()
    store.close()
