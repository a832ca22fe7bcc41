"""End to end through a real ``lipcert serve`` (uvicorn) process on a free loopback port.

Upload LipSDP's random_weights as ONNX (built here from the .mat), bound it with
LipSDP-Neuron (published 36.482), certify 32 inputs against radii computed independently
from onnxruntime's logits, use the OIP v2 endpoint, throw hostile requests at it (4xx
problem+json, server alive after each), restart it and find model and bound still there.
"""

from __future__ import annotations

import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.service.onnx_nets import assert_problem, lipsdp_weights, mlp_onnx
from tests.service.test_api_models import BAD_UPLOADS

pytestmark = pytest.mark.e2e

LIPSDP_NEURON_RANDOM = 36.482  # design.md §6, published value (3 decimals)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``lipcert serve`` subprocess on a data dir; start/stop can repeat."""

    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log = log
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.update(
            LIPCERT_DATA_DIR=str(self.data_dir),
            LIPCERT_MAX_UPLOAD_MB="0.5",
            LIPCERT_DEVICE="cpu",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
        )
        env.pop("LIPCERT_API_KEY", None)
        env.pop("LIPCERT_QUEUE_URL", None)
        env.update(self.env)
        cmd = [sys.executable, "-c", "from service.cli import main; main()"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def alive(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and httpx.get(self.url + "/v2/health/live", timeout=5).status_code == 200
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def _wait_job(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_upload_bound_certify_restart(server: Server, fixtures_dir: Path) -> None:
    onnx_bytes = mlp_onnx(lipsdp_weights(fixtures_dir))
    c = httpx.Client(base_url=server.url, timeout=120)
    up = c.post("/v1/models", files={"file": ("random_weights.onnx", onnx_bytes)})
    assert up.status_code == 201, up.text
    mid = up.json()["id"]
    assert up.json()["input_shape"] == [2] and up.json()["output_shape"] == [2]

    # certify before any bound: 409 with a hint
    assert_problem(c.post(f"/v1/models/{mid}/certify", json={"inputs": [[0, 0]]}), 409)

    # the unsound variant is refused
    assert_problem(c.post(f"/v1/models/{mid}/bounds", json={"method": "lipsdp-network"}), 422)

    pytest.importorskip("sdp.bounds", reason="needs the bounds package")
    from sdp import bounds as sdp_bounds

    if not hasattr(sdp_bounds, "compute_bound"):
        pytest.skip("sdp.bounds.compute_bound has not landed yet")
    r = c.post(f"/v1/models/{mid}/bounds", json={"method": "lipsdp-neuron"})
    assert r.status_code == 202, r.text
    job = _wait_job(c, r.json()["job_id"] if "job_id" in r.json() else r.json()["id"])
    assert job["status"] == "succeeded", job
    lip = job["result"]["lipschitz_bound"]
    assert job["result"]["verified"] is True
    assert LIPSDP_NEURON_RANDOM - 5e-4 <= lip <= LIPSDP_NEURON_RANDOM * 1.001

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2))
    body = c.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()
    assert body["lipschitz_bound"] == pytest.approx(lip, rel=1e-12)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x.astype(np.float32)})[0].astype(np.float64)
    margins = np.abs(ref[:, 0] - ref[:, 1])
    got = np.array([item["radius"] for item in body["results"]])
    np.testing.assert_allclose(got, margins / (math.sqrt(2) * lip), rtol=1e-4, atol=1e-7)
    assert [item["prediction"] for item in body["results"]] == np.argmax(ref, 1).tolist()

    npy = c.post(
        f"/v1/models/{mid}/certify",
        content=_npy(x),
        headers={"content-type": "application/x-npy"},
    ).json()
    assert npy["results"] == body["results"]
    # labels ride along in an .npz body: certified_accuracy as for the same JSON body
    labels = np.argmax(ref, 1)
    labels[::4] = 1 - labels[::4]  # a quarter misclassified
    eps = float(np.median(got))
    with_labels = c.post(
        f"/v1/models/{mid}/certify",
        json={"inputs": x.tolist(), "labels": labels.tolist(), "epsilon": eps},
    ).json()
    buf = io.BytesIO()
    np.savez_compressed(buf, inputs=x, labels=labels)
    npz = c.post(
        f"/v1/models/{mid}/certify?epsilon={eps}",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npz"},
    ).json()
    assert npz["accuracy"] == pytest.approx(0.75)
    want = np.mean((np.argmax(ref, 1) == labels) & (got > eps))
    assert npz["certified_accuracy"] == pytest.approx(want) == with_labels["certified_accuracy"]
    assert [r["certified"] for r in npz["results"]] == [
        r["certified"] for r in with_labels["results"]
    ]

    oip = c.post(
        f"/v2/models/{mid}/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [32, 2],
                    "datatype": "FP32",
                    "data": x.astype(np.float32).ravel().tolist(),
                }
            ]
        },
    )
    assert oip.status_code == 200, oip.text
    outs = {o["name"]: o["data"] for o in oip.json()["outputs"]}
    np.testing.assert_allclose(np.reshape(outs["logits"], (32, 2)), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        outs["certified_radius"], margins / (math.sqrt(2) * lip), rtol=1e-4, atol=1e-7
    )
    assert "lipcert_inference_batch_size" in c.get("/metrics").text

    server.stop()
    server.start()
    c = httpx.Client(base_url=server.url, timeout=120)
    assert c.get(f"/v1/models/{mid}").json()["sha256"] == up.json()["sha256"]
    again = c.post(f"/v1/models/{mid}/certify", json={"inputs": x.tolist()}).json()
    assert again["lipschitz_bound"] == pytest.approx(lip, rel=1e-12)
    assert again["results"] == body["results"]


def test_hostile_requests_get_4xx_and_server_survives(server: Server, fixtures_dir: Path) -> None:
    good = mlp_onnx(lipsdp_weights(fixtures_dir))
    c = httpx.Client(base_url=server.url, timeout=120)
    for name, make in BAD_UPLOADS.items():  # empty, garbage, truncated, external data, ...
        r = c.post("/v1/models", files={"file": (name, make(fixtures_dir, good))})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert server.alive(), name
    # over LIPCERT_MAX_UPLOAD_MB=0.5, streamed without Content-Length
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    big = (head if i == 0 else b"\x00" * 65536 for i in range(17))
    ctype = {"content-type": "multipart/form-data; boundary=xyz"}
    r = c.post("/v1/models", content=big, headers=ctype)
    assert_problem(r, 413, "payload-too-large")
    assert server.alive()
    mid = c.post("/v1/models", files={"file": ("m.onnx", good)}).json()["id"]
    for content, ctype in [
        (b"{not json", "application/json"),
        (b'{"inputs": [["NaN", 1]]}', "application/json"),
        (b'{"inputs": [[1, 2, 3]]}', "application/json"),
        (_npy(np.array([[np.nan, 1.0]])), "application/x-npy"),
        (b"PK\x05\x06 not a zip", "application/x-npz"),
        (_npz(inputs=np.array([[{}, 1]], dtype=object)), "application/x-npz"),
        (_npz(inputs=np.zeros((2, 2)), labels=np.array([0, 7])), "application/x-npz"),
    ]:
        r = c.post(f"/v1/models/{mid}/certify", content=content, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, r.text
        assert server.alive()
    assert_problem(c.get("/v1/models/0000000000000000"), 404)
    assert_problem(c.get("/v1/jobs/does-not-exist"), 404)
    assert_problem(c.patch("/v1/models"), 405)
    assert server.alive()
