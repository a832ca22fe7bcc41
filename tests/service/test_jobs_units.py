"""Job runner parts: request identity, SQLite state transitions, the solver process's error
path, bounded concurrency, and the Redis state script (real redis-server)."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from service.documents import JobError, strict_json
from service.jobs.base import JobRecord, JobSpec
from service.jobs.local import LocalRunner
from service.jobs.process import SolveProcess, supervise
from service.jobs.store import JobStore
from service.storage import Storage
from tests.redis_server import redis_server
from tests.service.jobs_support import LONG_SOLVE, big_random_net, wait_for, wait_pid_gone


def test_dedupe_key_is_model_method_pairwise_solver_only() -> None:
    base = JobSpec("m1", "lipsdp-neuron", False, None, timeout_s=10)
    assert base.dedupe_key() == JobSpec("m1", "lipsdp-neuron", False, None, 99).dedupe_key()
    for other in (
        JobSpec("m2", "lipsdp-neuron"),
        JobSpec("m1", "lipsdp-layer"),
        JobSpec("m1", "lipsdp-neuron", True),
        JobSpec("m1", "lipsdp-neuron", False, "scs"),
    ):
        assert other.dedupe_key() != base.dedupe_key()
    assert JobSpec.from_dict(base.to_dict()) == base


def test_store_transitions_first_terminal_wins(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b, c = (JobRecord(id=i, spec=JobSpec("m", "naive")) for i in "abc")
    for rec in (a, b, c):
        store.insert(rec)  # no owner: rows from before owners, failed by any restart
    assert store.mark_running("a", {"pid": 1})
    assert not store.mark_running("a", {"pid": 2})  # only from queued
    assert store.finish("a", "cancelled", error=JobError("cancelled", ""))
    assert not store.finish("a", "succeeded", result={"lipschitz_bound": 1.0})
    got = store.get("a")
    assert got is not None and got.status == "cancelled" and got.result is None
    store.set_progress("a", {"phase": "late"})  # ignored once ended
    assert store.get("a").progress == {}  # type: ignore[union-attr]
    assert store.finish("b", "succeeded", result={"lipschitz_bound": 2.0})
    # restart: queued/running jobs fail, ended ones are untouched
    assert store.fail_orphaned(30.0, "server-restarted", "server restarted") == 1
    assert store.get("c").error == JobError("server-restarted", "server restarted")  # type: ignore[union-attr]
    assert [r.id for r in store.find_reusable(a.spec.dedupe_key())] == ["b"]


def test_strict_json_makes_plain_json() -> None:
    out = strict_json(
        {"a": np.float64(1.5), "b": np.arange(3), "c": math.nan, "d": (np.int64(2),), 3: -math.inf}
    )
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [2], "3": None}
    assert isinstance(out, dict) and isinstance(out["b"], list) and type(out["b"][0]) is int
    assert json.loads(json.dumps(out, allow_nan=False)) == out


@pytest.mark.parametrize(
    ("model", "method", "code"),
    [
        ("0000000000000000", "naive", "model-not-found"),
        (None, "lipsdp-network", "unsupported-method"),
    ],
)
def test_solver_process_reports_errors_with_their_codes(
    tmp_path: Path, model: str | None, method: str, code: str
) -> None:
    storage = Storage(tmp_path)
    model_id = model or storage.save_model(big_random_net((3, 4, 2)), "tiny.mat").id
    proc = SolveProcess(("storage", str(tmp_path), model_id), JobSpec(model_id, method))
    outcome = supervise(proc, timeout_s=120, on_progress=lambda _: None, cancelled=lambda: False)
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.code == code
    assert wait_pid_gone(proc.pid or 0)


def test_local_runner_bounds_concurrency_and_cancels_queued_jobs(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    model_id = storage.save_model(big_random_net(), "big.mat").id
    runner = LocalRunner(storage, tmp_path, max_concurrent=1)
    runner.start()
    try:
        first = runner.submit(JobSpec(model_id, **LONG_SOLVE))
        second = runner.submit(JobSpec(model_id, "lipsdp-layer", solver="scs"))
        wait_for(lambda: runner.get(first.id).to_dict(), lambda j: j["status"] == "running")  # type: ignore[union-attr]
        time.sleep(0.5)  # a second worker slot would have started the second job by now
        assert runner.get(second.id).status == "queued"  # type: ignore[union-attr]
        cancelled = runner.cancel(second.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.started_at is None  # it never ran
        assert runner.cancel(first.id).status == "cancelled"  # type: ignore[union-attr]
    finally:
        runner.stop()
    assert runner.get(second.id).started_at is None  # type: ignore[union-attr]


@pytest.fixture
def redis_conn(tmp_path: Path) -> Iterator[object]:
    from redis import Redis

    with redis_server(tmp_path) as url:
        yield Redis.from_url(url)


@pytest.mark.redis
def test_redis_state_transitions_are_conditional(redis_conn: object) -> None:
    from service.jobs.redis_state import RedisJobs

    jobs = RedisJobs(redis_conn)
    rec = JobRecord(id="j1", spec=JobSpec("m", "naive"))
    jobs.create(rec, model_sha256="0" * 64, timeout_s=5.0)
    jobs.heartbeat("j1")  # not running yet: no heartbeat written
    assert "heartbeat" not in jobs.raw("j1")
    assert jobs.transition("j1", ("queued",), status="running", worker={"pid": 3})
    jobs.heartbeat("j1")
    assert float(jobs.raw("j1")["heartbeat"]) == pytest.approx(time.time(), abs=5)
    assert jobs.finish("j1", "cancelled", error=JobError("cancelled", ""), finished_at="t")
    assert not jobs.finish("j1", "succeeded", result={"lipschitz_bound": 1.0}, finished_at="t")
    got = jobs.get("j1")
    assert got is not None and got.status == "cancelled" and got.result is None
    assert got.worker == {"pid": 3} and got.spec == rec.spec
    assert jobs.get("missing") is None
    assert not jobs.transition("missing", ("queued",), status="running")


def test_worker_cli_refuses_a_missing_queue_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.delenv("LIPCERT_QUEUE_URL", raising=False)
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "LIPCERT_QUEUE_URL" in result.output
    result = CliRunner().invoke(app, ["worker", "--queue-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert "cannot reach Redis" in result.output


def test_settings_choose_the_runner(tmp_path: Path) -> None:
    from service.jobs import create_runner
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path, queue_url="", solver_threads=2, max_concurrent_jobs=3)
    runner = create_runner(settings, Storage(tmp_path))
    assert isinstance(runner, LocalRunner)
    assert (runner.threads, runner.max_concurrent) == (2, 3)
    assert (tmp_path / "jobs.sqlite").exists()


def test_solver_process_starts_with_its_thread_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    model_id = Storage(tmp_path).save_model(big_random_net(), "big.mat").id
    spec = JobSpec(model_id, **LONG_SOLVE)  # keeps the child alive while we look at it
    proc = SolveProcess(("storage", str(tmp_path), model_id), spec, threads=2)
    try:
        environ: list[bytes] = []
        deadline = time.monotonic() + 20
        while environ in ([], [b""]) and time.monotonic() < deadline:
            time.sleep(0.05)  # right after exec the kernel may still show it empty
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    finally:
        proc.kill()
    for name in (b"OMP_NUM_THREADS", b"OPENBLAS_NUM_THREADS", b"MKL_NUM_THREADS"):
        assert name + b"=2" in environ
    assert os.environ["OPENBLAS_NUM_THREADS"] == "7"  # the parent's own settings are restored
    assert "OMP_NUM_THREADS" not in os.environ


def test_terminate_from_another_thread_while_supervised(tmp_path: Path) -> None:
    """A cancel (another thread) terminates the child while the supervising thread reads its
    pipe: the supervisor ends 'cancelled', the pipe is closed exactly once (a double close
    raised EBADF in CI), and closing again is a no-op."""
    model_id = Storage(tmp_path).save_model(big_random_net(), "big.mat").id
    for _ in range(3):
        proc = SolveProcess(("storage", str(tmp_path), model_id), JobSpec(model_id, **LONG_SOLVE))
        flag = threading.Event()
        result: list[object] = []

        def run(
            p: SolveProcess = proc, ev: threading.Event = flag, out: list[object] = result
        ) -> None:
            out.append(supervise(p, timeout_s=120, on_progress=lambda _: None, cancelled=ev.is_set))

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.3)
        flag.set()
        proc.terminate()  # what LocalRunner.cancel does, on the request thread
        t.join(timeout=30)
        assert not t.is_alive()
        assert [getattr(o, "status", None) for o in result] == ["cancelled"]
        assert wait_pid_gone(proc.pid or 0)
        proc.close()  # idempotent


def test_solver_process_puts_the_solver_on_the_requested_device(tmp_path: Path) -> None:
    """LIPCERT_DEVICE reaches the solver process: cpu solves on numpy; cuda uses the torch
    backend where a GPU is visible and otherwise fails the job with device-unavailable."""
    import torch

    storage = Storage(tmp_path)
    model_id = storage.save_model(big_random_net((6, 300, 2)), "wide.mat").id
    spec = JobSpec(model_id, "lipsdp-neuron")
    outcomes = {}
    for device in ("cpu", "cuda"):
        proc = SolveProcess(("storage", str(tmp_path), model_id), spec, device=device)
        outcomes[device] = supervise(
            proc, timeout_s=120, on_progress=lambda _: None, cancelled=lambda: False
        )
    cpu = outcomes["cpu"]
    assert cpu.status == "succeeded" and cpu.result is not None
    assert not any("solver matrices on" in n for n in cpu.result["notes"])
    cuda = outcomes["cuda"]
    if torch.cuda.is_available():
        assert cuda.status == "succeeded" and cuda.result is not None
        assert "solver matrices on torch-cuda" in cuda.result["notes"]
        assert cuda.result["lipschitz_bound"] == pytest.approx(
            cpu.result["lipschitz_bound"], rel=1e-5
        )
    else:
        assert cuda.status == "failed" and cuda.error is not None
        assert cuda.error.code == "device-unavailable"


def test_in_flight_jobs_are_joined_only_with_the_same_time_limit() -> None:
    """Found by review: a request with timeout_s 3600 joined a running job limited to 4 s and
    failed with a timeout after 4 s."""
    stored = {"a"}

    def bound_stored(rec: JobRecord) -> bool:
        return rec.id in stored

    spec = JobSpec("m", "lipsdp-neuron", timeout_s=4.0)
    for status in ("queued", "running"):
        rec = JobRecord(id="a", spec=spec, status=status)  # type: ignore[arg-type]
        assert JobSpec("m", "lipsdp-neuron", timeout_s=4.0).reuses(rec, bound_stored)
        for other in (3600.0, 1.0, None):
            assert not JobSpec("m", "lipsdp-neuron", timeout_s=other).reuses(rec, bound_stored)
    done = JobRecord(id="a", spec=spec, status="succeeded")
    assert JobSpec("m", "lipsdp-neuron", timeout_s=None).reuses(done, bound_stored)
    stored.clear()  # its bound was deleted with the model: solve again
    assert not JobSpec("m", "lipsdp-neuron", timeout_s=4.0).reuses(done, bound_stored)
    for status in ("failed", "cancelled"):
        rec = JobRecord(id="a", spec=spec, status=status)  # type: ignore[arg-type]
        assert not spec.reuses(rec, lambda r: True)


@pytest.mark.redis
def test_rq_result_for_a_deleted_model_fails_the_job(tmp_path: Path, rw_weights) -> None:
    from service.jobs.rq import RqRunner
    from tests.service.onnx_nets import mlp_onnx

    storage = Storage(tmp_path / "data")
    model_id = storage.save_model(mlp_onnx(rw_weights)).id
    with redis_server(tmp_path) as url:
        runner = RqRunner(storage, url)
        rec = JobRecord(id="j1", spec=JobSpec(model_id, "naive"))
        runner.jobs.create(rec, model_sha256="0" * 64, timeout_s=5.0)
        assert runner.jobs.transition("j1", ("queued",), status="running")
        doc = {"lipschitz_bound": 1.0, "method": "naive", "verified": True, "job_id": "j1"}
        assert runner.jobs.finish("j1", "succeeded", result=doc, finished_at="t")
        storage.delete_model(model_id)
        got = runner.get("j1")  # the API side stores a finished job's result here
        assert got is not None and got.status == "failed", got
        assert got.error is not None and got.error.code == "model-deleted"
        assert storage.list_bounds(model_id) == []


@pytest.mark.redis
def test_rq_cancel_model_cancels_only_that_models_unfinished_jobs(tmp_path: Path) -> None:
    from service.jobs.rq import RqRunner

    with redis_server(tmp_path) as url:
        runner = RqRunner(Storage(tmp_path / "data"), url)
        for job_id, model_id in (("a", "m1"), ("b", "m2"), ("c", "m1")):
            rec = JobRecord(id=job_id, spec=JobSpec(model_id, "naive"))
            runner.jobs.create(rec, model_sha256="0" * 64, timeout_s=5.0)
        assert runner.jobs.finish(
            "c", "cancelled", error=JobError("cancelled", ""), finished_at="t"
        )
        assert runner.cancel_model("m1") == ["a"]
        got = runner.jobs.get("a")
        assert got is not None and got.status == "cancelled"
        assert got.error is not None and got.error.code == "model-deleted"
        other = runner.jobs.get("b")
        assert other is not None and other.status == "queued"


@pytest.mark.redis
def test_rq_rechecks_share_a_bounded_pool(tmp_path: Path) -> None:
    """Finished certification jobs are re-checked on ``recheck_workers`` shared threads, one
    re-check per job however often it is read, the others wait in phase ``recheck``; stop()
    drops the queued ones (a later read starts them again). The re-check itself is replaced
    by one that waits for the test (the real one, minutes on a large job, is tested in
    tests/e2e/test_local_rq.py): what is checked here is only how many run at once."""
    from service.jobs.rq import RqRunner

    gate = threading.Event()
    lock = threading.Lock()
    running: list[str] = []
    peak = [0]
    ran: list[str] = []

    class HeldRecheck(RqRunner):
        def _copy_certification(self, rec: JobRecord) -> bool:
            with lock:
                running.append(rec.id)
                peak[0] = max(peak[0], len(running))
            gate.wait(30)
            with lock:
                running.remove(rec.id)
                ran.append(rec.id)
            return True

    def _until(cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, (running, ran)
            time.sleep(0.02)

    def finished_jobs(runner: RqRunner, ids: list[str]) -> None:
        for job_id in ids:
            spec = JobSpec("m", "crown", kind="certification", certify={})
            runner.jobs.create(JobRecord(id=job_id, spec=spec), model_sha256="0" * 64, timeout_s=5)
            pending = {"kind": "certification", "rechecked": False}
            assert runner.jobs.finish(job_id, "succeeded", result=pending, finished_at="t")

    with redis_server(tmp_path) as url:
        runner = HeldRecheck(Storage(tmp_path / "data"), url, recheck_workers=2)
        ids = [f"c{i}" for i in range(5)]
        finished_jobs(runner, ids)
        for _ in range(2):
            for job_id in ids:
                got = runner.get(job_id)
                assert got is not None and got.status == "running", got
                assert got.progress["phase"] == "recheck" and got.result is None
        _until(lambda: len(running) == 2)
        time.sleep(0.2)  # a third thread would start now
        assert peak[0] == 2 and ran == []
        gate.set()
        _until(lambda: len(ran) == 5)
        assert sorted(ran) == ids and peak[0] == 2  # each job once, never more than two
        _until(lambda: not runner._rechecking)

        gate.clear()
        ran.clear()
        more = [f"d{i}" for i in range(4)]
        finished_jobs(runner, more)
        for job_id in more:
            runner.get(job_id)
        _until(lambda: len(running) == 2)
        runner.stop()  # the two queued ones are dropped, the two at work finish
        gate.set()
        _until(lambda: len(ran) == 2)
        _until(lambda: not runner._rechecking)
        time.sleep(0.2)
        assert len(ran) == 2 and not running
