"""Certify with an ``application/x-npz`` body (``inputs.npy`` + optional ``labels.npy``): the
same answer, certified_accuracy included, as a JSON body with the same inputs and labels; and
hostile archives (garbage, pickles/object arrays, bad labels, zip bombs, too many members,
lying directories) get 4xx problem+json with stable codes, the server staying ready."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from service.bodies.media import NPZ_MEDIA_TYPE
from service.documents import StoredBound
from tests.service.onnx_nets import assert_problem

NPZ_BODY = {"content-type": NPZ_MEDIA_TYPE}


def _npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _patch_directory(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``body`` with a field of its (first) central directory entry overwritten."""
    at = body.index(b"PK\x01\x02") + offset
    return body[:at] + struct.pack(fmt, value) + body[at + struct.calcsize(fmt) :]


@pytest.mark.parametrize("rows", [40, 6000])  # unzipped inline / off the event loop (96 KB)
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_body_with_labels_equals_the_json_body(client, model, rows, compressed) -> None:
    mid, _ = model
    x = np.random.default_rng(rows).normal(size=(rows, 2))
    path = f"/v1/models/{mid}/certify"
    plain = client.post(path, json={"inputs": x.tolist()}).json()
    preds = np.array([r["prediction"] for r in plain["results"]])
    labels = np.where(np.arange(rows) % 3 == 0, 1 - preds, preds)  # a third misclassified
    eps = float(np.median([r["radius"] for r in plain["results"]]))
    js = client.post(
        path, json={"inputs": x.tolist(), "labels": labels.tolist(), "epsilon": eps}
    ).json()
    assert js["accuracy"] == pytest.approx(np.mean(labels == preds))
    assert 0 < js["certified_accuracy"] < js["accuracy"]

    body = _npz(compressed, inputs=x, labels=labels.astype(np.int32))
    got = client.post(f"{path}?epsilon={eps}", content=body, headers=NPZ_BODY)
    assert got.status_code == 200, got.text
    assert got.json() == js  # every field and number, certified_accuracy included

    # the columnar answer too, and labels of any integer dtype
    body = _npz(compressed, inputs=x.astype(np.float32), labels=labels.astype(np.uint8))
    f32 = client.post(f"{path}?epsilon={eps}", content=body, headers=NPZ_BODY)
    js32 = client.post(
        path,
        json={
            "inputs": x.astype(np.float32).astype(np.float64).tolist(),
            "labels": labels.tolist(),
            "epsilon": eps,
        },
    ).json()
    assert f32.json() == js32
    columns = client.post(
        f"{path}?epsilon={eps}", content=body, headers={**NPZ_BODY, "accept": NPZ_MEDIA_TYPE}
    )
    with np.load(io.BytesIO(columns.content), allow_pickle=False) as z:
        assert float(z["certified_accuracy"]) == js32["certified_accuracy"]
        assert z["label"].tolist() == labels.tolist()
        assert z["certified"].tolist() == [r["certified"] for r in js32["results"]]


def test_npz_body_without_labels_equals_the_npy_body(client, model) -> None:
    mid, _ = model
    x = np.random.default_rng(1).normal(size=(25, 2))
    path = f"/v1/models/{mid}/certify?return_logits=true"
    npy = client.post(path, content=_npy(x), headers={"content-type": "application/x-npy"})
    npz = client.post(path, content=_npz(inputs=x), headers=NPZ_BODY)
    assert npz.status_code == 200, npz.text
    assert npz.json() == npy.json()
    assert npz.json()["certified_accuracy"] is None


def _bodies() -> dict[str, tuple[bytes, str, str]]:
    """Hostile or malformed .npz bodies and the problem code each must get."""
    x = np.random.default_rng(2).normal(size=(4, 2))
    good = _npz(inputs=x, labels=np.array([0, 1, 0, 1]))
    three = _zip({"inputs.npy": _npy(x), "labels.npy": _npy(np.zeros(4, int)), "x.npy": b""})
    # a directory with three entries whose end record claims two
    three_said_two = bytearray(three)
    end = three_said_two.rindex(b"PK\x05\x06")
    three_said_two[end + 8 : end + 12] = struct.pack("<2H", 2, 2)
    end = good.rindex(b"PK\x05\x06")
    zip64 = good[:end] + b"PK\x06\x07" + bytes(16) + good[end:]
    # 1 MiB of zeros deflates to ~1 KB: over the 0.5 MiB cap once inflated
    bomb = _zip({"inputs.npy": _npy(np.zeros((65536, 2)))}, zipfile.ZIP_DEFLATED)
    # a member that inflates past its declared size (usize at offset 24 of the entry)
    lying = _patch_directory(_zip({"inputs.npy": _npy(x)}, zipfile.ZIP_DEFLATED), 24, "<L", 100)
    encrypted = _patch_directory(good, 8, "<H", 1)  # general purpose flag bit 0
    return {  # name: (body, problem code, a fragment of the detail: the reason)
        "empty": (b"", "invalid-npz", "not an .npz"),
        "garbage": (b"PK\x03\x04 certainly not a zip archive", "invalid-npz", "not an .npz"),
        "npy, not npz": (_npy(x), "invalid-npz", "not an .npz"),
        "truncated": (good[: len(good) // 2], "invalid-npz", "not an .npz"),
        "no inputs": (_npz(labels=np.array([0, 1])), "invalid-npz", "no inputs.npy"),
        "other member": (_npz(inputs=x, extra=x), "invalid-npz", "unexpected members"),
        "three members": (three, "invalid-npz", "declares 3 members"),
        "directory lies about the count": (bytes(three_said_two), "invalid-npz", "holds members"),
        "zip64": (zip64, "invalid-npz", "zip64"),
        "zip bomb": (bomb, "invalid-npz", "declare 1048704 bytes uncompressed"),
        "inflates past its size": (lying, "invalid-npz", "CRC"),
        "encrypted": (encrypted, "invalid-npz", "encrypted"),
        "object inputs (pickle)": (
            _npz(inputs=np.array([[{}, 1]], dtype=object)),
            "invalid-input",
            "inputs.npy: .npy dtype object",
        ),
        "object labels (pickle)": (
            _npz(inputs=x, labels=np.array([0, 1, "a", None], dtype=object)),
            "invalid-input",
            "labels.npy: .npy dtype object",
        ),
        "pickle bytes as inputs": (
            _zip({"inputs.npy": b"\x80\x04K\x01."}),
            "invalid-npy",
            "inputs.npy: the body is not a .npy",
        ),
        "float labels": (
            _npz(inputs=x, labels=np.array([0.0, 1.0, 0.0, 1.0])),
            "invalid-npz",
            "labels are integer",
        ),
        "2-D labels": (_npz(inputs=x, labels=np.zeros((4, 1), int)), "invalid-npz", "[batch]"),
        "too few labels": (_npz(inputs=x, labels=np.array([0, 1, 0])), "invalid-input", "3 labels"),
        "too many labels": (_npz(inputs=x, labels=np.zeros(5, int)), "invalid-input", "5 labels"),
        "label too big": (
            _npz(inputs=x, labels=np.array([0, 1, 2, 0])),
            "invalid-input",
            "class indices in [0, 2)",
        ),
        "negative label": (
            _npz(inputs=x, labels=np.array([0, -1, 0, 0])),
            "invalid-input",
            "class indices in [0, 2)",
        ),
        "NaN input": (_npz(inputs=np.array([[np.nan, 1.0]])), "invalid-input", "NaN"),
        "wrong input shape": (_npz(inputs=np.zeros((2, 3))), "wrong-input-shape", "[2, 3]"),
    }


@pytest.mark.parametrize("name", list(_bodies()))
def test_bad_npz_bodies_are_problems(make_client, rw_onnx, name) -> None:
    client = make_client(max_upload_mb=0.5)
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    client.app.state.storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 10.0, "method": "naive", "verified": True})
    )
    body, code, reason = _bodies()[name]
    r = client.post(f"/v1/models/{mid}/certify", content=body, headers=NPZ_BODY)
    assert reason in assert_problem(r, 422, code)["detail"]
    assert client.get("/v2/health/ready").status_code == 200


def test_npz_body_over_the_upload_cap_is_413(make_client, rw_onnx) -> None:
    client = make_client(max_upload_mb=0.5)
    mid = client.post("/v1/models", files={"file": ("rw.onnx", rw_onnx)}).json()["id"]
    body = _npz(inputs=np.random.default_rng(3).normal(size=(40000, 2)))  # 640 KB stored
    r = client.post(f"/v1/models/{mid}/certify", content=body, headers=NPZ_BODY)
    assert_problem(r, 413, "payload-too-large")
