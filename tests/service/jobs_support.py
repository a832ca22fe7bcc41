"""Helpers shared by the bound-job tests (local runner, RQ): nets, uploads, polling, pids."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

LIPSDP_NEURON_RANDOM_WEIGHTS = 36.482
"""LipSDP-Neuron bound of LipSDP's random_weights example (design.md §6)."""


LONG_SOLVE: dict[str, str] = {"method": "lipsdp-neuron", "solver": "scs"}
"""A request that keeps a solver busy for minutes on :func:`big_random_net` (SCS through
CVXPY on a 620 x 620 LMI), so cancel / timeout / kill land mid-solve on any machine."""


def mat_bytes(weights: list[np.ndarray]) -> bytes:
    """A LipSDP-style .mat file: cell array ``weights`` of (out, in) float64 matrices."""
    from scipy.io import savemat

    cell = np.empty((1, len(weights)), dtype=object)
    for i, w in enumerate(weights):
        cell[0, i] = np.asarray(w, dtype=np.float64)
    buf = io.BytesIO()
    savemat(buf, {"weights": cell})
    return buf.getvalue()


def big_random_net(widths: tuple[int, ...] = (20, 300, 300, 10), seed: int = 7) -> bytes:
    """A ReLU net wide enough that LipSDP-Neuron runs for a long time (for cancel/timeout)."""
    rng = np.random.default_rng(seed)
    ws = [
        rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        for n_in, n_out in itertools.pairwise(widths)
    ]
    return mat_bytes(ws)


def upload(client: Any, data: bytes, filename: str) -> str:
    """Store a model in the app's storage (the upload route is tested elsewhere); its id."""
    return str(client.app.state.storage.save_model(data, filename).id)


def random_weights(fixtures_dir: Path) -> bytes:
    return (fixtures_dir / "lipsdp" / "random_weights.mat").read_bytes()


def job_getter(client: Any, job_id: str) -> Callable[[], dict[str, Any]]:
    """A ``get_job()`` for :func:`wait_for`: GET /v1/jobs/{job_id}, asserting 200."""

    def get() -> dict[str, Any]:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    return get


def post_bound(client: Any, model_id: str, **body: Any) -> dict[str, Any]:
    """POST /v1/models/{model_id}/bounds; asserts 202 and the job's Location header."""
    r = client.post(f"/v1/models/{model_id}/bounds", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['job_id']}"
    return dict(job)


def lipcert_exe() -> str:
    """Path of the ``lipcert`` console script (skips the test when it is not installed)."""
    exe = Path(sys.executable).with_name("lipcert")
    found = str(exe) if exe.exists() else shutil.which("lipcert")
    if found is None:
        pytest.skip("the lipcert console script is not installed (pip install -e .)")
    return found


def wait_for(
    get_job: Callable[[], dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float = 300.0,
    poll_s: float = 0.1,
) -> dict[str, Any]:
    """Poll ``get_job()`` until ``done(job)``; fails with the last state after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    job = get_job()
    while not done(job):
        assert time.monotonic() < deadline, f"gave up waiting; last state: {job}"
        time.sleep(poll_s)
        job = get_job()
    return job


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def solving(job: dict[str, Any]) -> bool:
    """Running with a solver pid, and the solver has reported a phase past loading."""
    if ended(job):
        return True
    return (
        job["status"] == "running"
        and bool(job["worker"].get("pid"))
        and job["progress"].get("phase") not in (None, "load")
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_pid_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def tiny_residual_onnx(seed: int = 3) -> bytes:
    """ONNX ``y = W3 (x + W2 relu(W1 x + b1) + b2) + b3`` (4 -> 8 -> 4, skip, -> 3): not a chain."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["g"], transB=1),
        helper.make_node("Add", ["x", "g"], ["s"]),
        helper.make_node("Gemm", ["s", "W3", "b3"], ["y"], transB=1),
    ]
    inits = [
        init("W1", (8, 4)),
        init("b1", (8,)),
        init("W2", (4, 8)),
        init("b2", (4,)),
        init("W3", (3, 4)),
        init("b3", (3,)),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
