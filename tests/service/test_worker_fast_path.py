"""The inference worker's inline fast path (small CPU requests on an idle worker run on the
caller's thread): same logits and error bounds as the queued path, never while another
forward pass holds the device, never once the worker is stopped or for an unmeasured model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.errors import ServiceBusy
from service.settings import Settings
from service.storage import Storage
from service.worker import INLINE_ROWS, InferenceWorker
from tests.service.onnx_nets import mlp_onnx


@pytest.fixture
def worker_and_model(tmp_path: Path):
    rng = np.random.default_rng(0)
    onnx_bytes = mlp_onnx([rng.normal(size=(8, 5)), rng.normal(size=(3, 8))])
    storage = Storage(tmp_path)
    rec = storage.save_model(onnx_bytes, "n.onnx")
    worker = InferenceWorker(storage, Settings(data_dir=tmp_path, device="cpu", queue_size=1))
    worker.start()
    yield worker, rec.id
    worker.stop()


def test_inline_and_queued_passes_agree(worker_and_model) -> None:
    worker, mid = worker_and_model
    x = np.random.default_rng(1).normal(size=(INLINE_ROWS, 5))
    assert worker._try_inline(mid, x, True) is None  # model never ran: no measured cost yet

    async def run():
        queued = await worker.infer_bounded(mid, x)  # loads the model, measures its cost
        inline = None
        for _ in range(20):  # a pass slowed down by machine load (> 1 ms) is not inlined
            await worker.infer_bounded(mid, x)
            inline = worker._try_inline(mid, x, True)
            if inline is not None:
                break
        via_submit = await worker.infer_bounded(mid, x)
        return queued, inline, via_submit

    queued, inline, via_submit = asyncio.run(run())
    assert inline is not None
    for got in (inline, via_submit):
        np.testing.assert_array_equal(got[0], queued[0])
        np.testing.assert_array_equal(got[1], queued[1])
    big = np.zeros((INLINE_ROWS + 1, 5))
    assert asyncio.run(worker.infer(mid, big)).shape == (INLINE_ROWS + 1, 3)


def test_no_inline_pass_while_the_device_is_busy_or_the_worker_stopped(worker_and_model) -> None:
    worker, mid = worker_and_model
    x = np.ones((1, 5))

    async def run():
        want = await worker.infer(mid, x)
        with worker._device_lock:  # another forward pass is running
            assert worker._try_inline(mid, x, False) is None
            pending = asyncio.ensure_future(worker.infer(mid, x))  # goes to the queue
            await asyncio.sleep(0.05)
            assert not pending.done()  # waits for the device
        np.testing.assert_array_equal(await asyncio.wait_for(pending, 10), want)
        worker.stop()
        assert worker._try_inline(mid, x, False) is None
        worker._queue.put_nowait(object())  # nothing drains the single slot now
        with pytest.raises(ServiceBusy):
            await worker.infer(mid, x)

    asyncio.run(run())
