"""InferenceWorker.stop(): no request is left waiting forever (issue 17, item 6).

Before the fix, a request queued behind the stop marker (submitted while the worker was
finishing its last batch) was never resolved: its caller awaited a thread that was gone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import ServiceBusy
from service.settings import Settings
from service.storage import Storage
from service.worker import _STOP, InferenceWorker, _Request
from tests.service.onnx_nets import mlp_onnx


@pytest.fixture
def worker_and_model(tmp_path: Path):
    rng = np.random.default_rng(0)
    onnx_bytes = mlp_onnx([rng.normal(size=(8, 5)), rng.normal(size=(3, 8))])
    storage = Storage(tmp_path)
    rec = storage.save_model(onnx_bytes, "n.onnx")
    worker = InferenceWorker(storage, Settings(data_dir=tmp_path, device="cpu", max_wait_ms=0))
    worker.start()
    yield worker, rec.id
    worker.stop()


def _wait_until(cond, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


def test_requests_behind_the_stop_marker_are_refused_not_forgotten(worker_and_model) -> None:
    worker, mid = worker_and_model
    x = np.ones((INLINE_FREE_ROWS, 5))

    async def run():
        loop = asyncio.get_running_loop()
        worker._device_lock.acquire()  # the worker thread will block inside its batch
        first = asyncio.ensure_future(worker.infer(mid, x))
        await asyncio.to_thread(_wait_until, lambda: worker._collecting and worker._queue.empty())
        stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 30.0})
        stopper.start()
        await asyncio.to_thread(_wait_until, lambda: worker._stopping)
        with pytest.raises(ServiceBusy):  # submitted after stop(): refused, not left waiting
            await worker.infer(mid, x)
        # a request that slipped into the queue behind the marker (the submit/stop race)
        _wait_until(lambda: not worker._queue.empty())
        late: asyncio.Future = loop.create_future()
        worker._queue.put(_Request(mid, x, late, loop, False))
        worker._device_lock.release()
        logits = await first  # the batch in hand is still served
        with pytest.raises(ServiceBusy):
            await asyncio.wait_for(late, 30.0)
        await asyncio.to_thread(stopper.join, 30.0)
        return logits

    logits = asyncio.run(run())
    assert logits.shape == (INLINE_FREE_ROWS, 3)
    assert not worker.alive


def test_stop_keeps_the_marker_for_a_busy_thread(worker_and_model) -> None:
    worker, _ = worker_and_model
    worker._queue.put(_STOP)
    worker._refuse_queued()
    assert worker._queue.get_nowait() is _STOP


INLINE_FREE_ROWS = 64  # more rows than the inline fast path takes: always queued
