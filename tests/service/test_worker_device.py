"""The inference worker on each device it may own (CPU here; CUDA where a GPU is present):
float64 logits of the stored network, within the worker's own rounding bound E(x) of the
IR's float64 forward pass (two float64 evaluations differ by at most 2 E(x)). On CUDA this
fails if TF32 or float32 sneaks into the pass, since E(x) assumes float64 arithmetic."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from service.settings import Settings
from service.storage import Storage
from service.worker import InferenceWorker
from tests.service.onnx_nets import mlp_onnx

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_worker_logits_are_float64_within_the_rounding_bound(tmp_path: Path, device: str) -> None:
    rng = np.random.default_rng(11)
    ws = [rng.normal(size=(64, 30)), rng.normal(size=(48, 64)), rng.normal(size=(10, 48))]
    storage = Storage(tmp_path)
    rec = storage.save_model(mlp_onnx(ws), "mlp.onnx")
    net = storage.load_network(rec.id)
    worker = InferenceWorker(storage, Settings(data_dir=tmp_path, device=device))
    worker.start()
    try:
        assert worker.device == device and worker.dtype_name == "float64"
        x = rng.normal(size=(300, 30)) * 10.0
        logits, err = asyncio.run(worker.infer_bounded(rec.id, x))
    finally:
        worker.stop()
    assert logits.dtype == np.float64 and logits.shape == (300, 10)
    want = net.forward(x)
    gap = np.linalg.norm(logits - want, axis=1)
    assert np.all(err > 0)
    assert np.all(gap <= 2 * err), float(np.max(gap / err))
    # and the bound is not vacuous: float64 rounding, far below the logits' scale
    assert float(np.max(err)) < 1e-9 * float(np.abs(want).max())
