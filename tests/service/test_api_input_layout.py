"""A model whose ONNX input is NHWC and transposed to NCHW on entry: every way in (JSON flat and
shaped rows, .npy, .npz, OIP infer) takes inputs in the file's layout, exactly as onnxruntime
does, and the metadata reports the file's input shape.

onnxruntime is the oracle for logits and predictions; radii are (margin - sqrt(2) E) /
(sqrt(2) L) as for any model, E the float64 rounding bound of the IR (a permutation keeps ||x||).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from sdp.importers import load_model
from sdp.rounding import logit_error_bound, unit_roundoff
from service.documents import StoredBound
from service.storage import Storage
from service.worker import ROUNDING_SAFETY
from tests.sdp.test_importers_input_layout import conv_net_onnx, ort_logits
from tests.service.old_store import OLD_TABLES
from tests.service.onnx_nets import assert_oip_error, assert_problem

FILE_SHAPE = (4, 5, 3)  # NHWC, batch dropped
IR_SHAPE = (3, 4, 5)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _naive_bound(net) -> float:
    """Product of spectral norms of the unrolled layers: valid for a ReLU chain."""
    return float(np.prod([np.linalg.norm(w, 2) for w in net.chain().weights()]))


@pytest.fixture(scope="module")
def nhwc() -> tuple[bytes, object]:
    data = conv_net_onnx(nhwc=True)
    return data, load_model(data)


@pytest.fixture
def model(client, nhwc) -> tuple[str, float]:
    data, net = nhwc
    r = client.post("/v1/models", files={"file": ("nhwc.onnx", data)})
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    lip = _naive_bound(net)
    client.app.state.storage.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": lip, "method": "naive", "verified": True, "job_id": "j"}
        ),
    )
    return mid, lip


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    """n NHWC inputs, float32-representable (so onnxruntime sees the very same numbers)."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, *FILE_SHAPE))
    return x.astype(np.float32).astype(np.float64)


def _check_rows(results: list[dict], x: np.ndarray, nhwc: tuple[bytes, object], lip: float) -> None:
    """Per-row answers against onnxruntime on the same file-layout inputs."""
    data, net = nhwc
    want = ort_logits(data, x)
    logits = np.array([r["logits"] for r in results])
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # the very IR that was bounded, on the permuted input: float64 all along
    np.testing.assert_allclose(logits, net.forward(net.ir_inputs(x)), rtol=1e-12, atol=1e-12)
    assert [r["prediction"] for r in results] == np.argmax(want, axis=1).tolist()
    err = logit_error_bound(net, unit_roundoff("float64"), safety=ROUNDING_SAFETY)(net.ir_inputs(x))
    for r, row, e in zip(results, logits, err, strict=True):
        top = np.sort(row)
        assert r["margin"] == pytest.approx(top[-1] - top[-2], rel=1e-12)
        expected = (r["margin"] - math.sqrt(2) * e) / (math.sqrt(2) * lip)
        assert r["radius"] == pytest.approx(expected, rel=1e-12)


def test_metadata_reports_the_files_input_shape(client, model) -> None:
    mid, _ = model
    info = client.get(f"/v1/models/{mid}").json()
    assert info["input_shape"] == list(FILE_SHAPE)
    assert info["ir_input_shape"] == list(IR_SHAPE) and info["input_permutation"] == [2, 0, 1]
    oip = client.get(f"/v2/models/{mid}").json()
    assert oip["inputs"][0]["shape"] == [-1, *FILE_SHAPE]
    # an NCHW model without the Transpose: nothing extra, as before
    r = client.post("/v1/models", files={"file": ("nchw.onnx", conv_net_onnx(nhwc=False))})
    plain = r.json()
    assert plain["input_shape"] == list(IR_SHAPE)
    assert plain["ir_input_shape"] is None and plain["input_permutation"] is None


def test_json_flat_and_shaped_rows_are_in_the_files_layout(client, model, nhwc) -> None:
    mid, lip = model
    x = _inputs(7)
    for rows in (x.reshape(7, -1), x):
        body = {"inputs": rows.tolist(), "return_logits": True}
        r = client.post(f"/v1/models/{mid}/certify", json=body)
        assert r.status_code == 200, r.text
        _check_rows(r.json()["results"], x, nhwc, lip)
    # rows shaped like the IR's (C, H, W) input are not what the file takes
    wrong = {"inputs": x.reshape(7, *IR_SHAPE).tolist()}
    assert_problem(client.post(f"/v1/models/{mid}/certify", json=wrong), 422, "wrong-input-shape")


@pytest.mark.parametrize("layout", ["shaped", "flat", "fortran"])
def test_npy_body_is_in_the_files_layout(client, model, nhwc, layout) -> None:
    mid, lip = model
    x = _inputs(5, seed=1)
    arr = {"shaped": x, "flat": x.reshape(5, -1), "fortran": np.asfortranarray(x)}[layout]
    r = client.post(
        f"/v1/models/{mid}/certify?return_logits=true",
        content=_npy(arr.astype(np.float32)),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 200, r.text
    _check_rows(r.json()["results"], x, nhwc, lip)


def test_npy_body_in_several_blocks(client, model, nhwc) -> None:
    """Enough rows for several streamed row blocks (each permuted on the worker)."""
    mid, _ = model
    x = _inputs(9000, seed=2)
    r = client.post(
        f"/v1/models/{mid}/certify?return_logits=true",
        content=_npy(x.astype(np.float32)),
        headers={"content-type": "application/x-npy", "accept": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        logits, pred = z["logits"], z["prediction"]
    data, _ = nhwc
    want = ort_logits(data, x)
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
    close = np.sort(want, axis=1)[:, -1] - np.sort(want, axis=1)[:, -2] > 1e-4
    assert (pred == np.argmax(want, axis=1))[close].all()


def test_npz_body_is_in_the_files_layout(client, model, nhwc) -> None:
    mid, lip = model
    x = _inputs(6, seed=3)
    labels = np.argmax(ort_logits(nhwc[0], x), axis=1)
    buf = io.BytesIO()
    np.savez(buf, inputs=x.astype(np.float32), labels=labels)
    r = client.post(
        f"/v1/models/{mid}/certify?return_logits=true",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    _check_rows(body["results"], x, nhwc, lip)
    assert body["accuracy"] == 1.0


def test_oip_infer_is_in_the_files_layout(client, model, nhwc) -> None:
    mid, lip = model
    x = _inputs(4, seed=4)
    want = ort_logits(nhwc[0], x)
    for shape in ([4, *FILE_SHAPE], [4, 60]):
        tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": x.ravel().tolist()}
        r = client.post(f"/v2/models/{mid}/infer", json={"inputs": [tensor]})
        assert r.status_code == 200, r.text
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        logits = np.reshape(out["logits"], (4, 3))
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert out["prediction"] == np.argmax(want, axis=1).tolist()
        net = nhwc[1]
        x32 = x.astype(np.float32).astype(np.float64)  # FP32 tensors: what the network sees
        err = logit_error_bound(net, unit_roundoff("float64"), safety=ROUNDING_SAFETY)(
            net.ir_inputs(x32)
        )
        top2 = np.sort(logits, axis=1)[:, -2:]
        expected = (top2[:, 1] - top2[:, 0] - math.sqrt(2) * err) / (math.sqrt(2) * lip)
        np.testing.assert_allclose(out["certified_radius"], expected, rtol=1e-12)
    one = {
        "name": "x",
        "shape": list(FILE_SHAPE),
        "datatype": "FP32",
        "data": x[0].ravel().tolist(),
    }
    r = client.post(f"/v2/models/{mid}/infer", json={"inputs": [one]})
    np.testing.assert_allclose(
        r.json()["outputs"][0]["data"], want[0], rtol=0, atol=1e-5 * np.abs(want).max()
    )
    bad = {"name": "x", "shape": [4, *IR_SHAPE], "datatype": "FP32", "data": x.ravel().tolist()}
    assert_oip_error(client.post(f"/v2/models/{mid}/infer", json={"inputs": [bad]}), 400)


def test_a_database_from_before_the_layout_column_is_migrated(tmp_path: Path) -> None:
    """Rows written before ``input_layout`` held the IR shape of a transposed model; opening
    the store records the file's shape and the permutation (and leaves other rows alone)."""
    (tmp_path / "models").mkdir()
    rows = []
    for name, data, shape in (
        ("nhwc.onnx", conv_net_onnx(nhwc=True), IR_SHAPE),  # what the old code stored
        ("nchw.onnx", conv_net_onnx(nhwc=False), IR_SHAPE),
    ):
        sha = hashlib.sha256(data).hexdigest()
        (tmp_path / "models" / f"{sha}.bin").write_bytes(data)
        rows.append((sha[:16], sha, name, "onnx", "conv", json.dumps(list(shape)), "[3]", 2, 1,
                     len(data), "2026-01-01T00:00:00Z"))  # fmt: skip
    db = sqlite3.connect(tmp_path / "lipcert.sqlite3")
    db.executescript(OLD_TABLES)
    db.executemany("INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    store = Storage(tmp_path)
    assert store.reimport_stale_models(load_model) == {rows[0][0]: "ok", rows[1][0]: "ok"}
    moved, plain = store.get_model(rows[0][0]), store.get_model(rows[1][0])
    assert moved is not None and plain is not None
    assert moved.input_shape == list(FILE_SHAPE)
    assert moved.ir_input_shape == list(IR_SHAPE) and moved.input_permutation == [2, 0, 1]
    assert plain.input_shape == list(IR_SHAPE) and plain.ir_input_shape is None
    assert Storage(tmp_path).reimport_stale_models(load_model) == {}  # nothing left to do
    assert store.get_model(rows[0][0]) == moved
