"""Model registry over HTTP: content addressing, metadata, persistence, and untrusted uploads
that must be refused with a 4xx problem+json while the server stays up."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.documents import StoredBound
from tests.service.onnx_nets import assert_problem, mlp_onnx


def upload(client, data: bytes, name: str = "model.onnx"):
    return client.post("/v1/models", files={"file": (name, data, "application/octet-stream")})


def test_upload_onnx_metadata_and_same_bytes_same_id(client, rw_onnx, rw_weights) -> None:
    r = upload(client, rw_onnx)
    assert r.status_code == 201, r.text
    info = r.json()
    assert r.headers["location"] == f"/v1/models/{info['id']}"
    assert info["format"] == "onnx"
    assert info["kind"] == "feedforward"
    assert info["input_shape"] == [2] and info["output_shape"] == [2]
    assert info["layers"] == len(rw_weights) == 4
    assert info["parameters"] == sum(w.size + w.shape[0] for w in rw_weights)  # + zero biases
    import hashlib

    assert info["sha256"] == hashlib.sha256(rw_onnx).hexdigest()
    assert info["id"] == info["sha256"][:16]
    again = upload(client, rw_onnx, "other-name.onnx")
    assert again.status_code == 200
    assert again.json()["id"] == info["id"]
    assert [m["id"] for m in client.get("/v1/models").json()["models"]] == [info["id"]]
    assert client.get(f"/v1/models/{info['id']}").json() == info


def test_delete_then_404(client, rw_onnx) -> None:
    mid = upload(client, rw_onnx).json()["id"]
    assert client.delete(f"/v1/models/{mid}").status_code == 204
    assert_problem(client.get(f"/v1/models/{mid}"), 404, "model-not-found")
    assert_problem(client.delete(f"/v1/models/{mid}"), 404, "model-not-found")
    assert client.get("/v1/models").json()["models"] == []


def test_models_and_bounds_survive_restart(make_client, rw_onnx) -> None:
    first = make_client()
    mid = upload(first, rw_onnx).json()["id"]
    first.app.state.storage.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 99.0, "method": "naive", "verified": True})
    )
    first.__exit__(None, None, None)
    second = make_client()
    assert second.get(f"/v1/models/{mid}").status_code == 200
    assert second.app.state.storage.best_bound(mid).lipschitz_bound == 99.0


def test_mat_upload(client, fixtures_dir) -> None:
    data = (fixtures_dir / "lipsdp" / "random_weights.mat").read_bytes()
    r = upload(client, data, "random_weights.mat")
    assert r.status_code == 201 and r.json()["format"] == "mat"


def _graph_model(nodes, inits, n_in=2, n_out=2, opset=13, domain_opsets=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n_out])],
        inits,
    )
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domain_opsets)]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 8
    return model


def _external_data_onnx() -> bytes:
    model = _graph_model(
        [helper.make_node("Gemm", ["input", "W"], ["logits"], transB=1)],
        [numpy_helper.from_array(np.ones((2, 2), np.float32), "W")],
    )
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return model.SerializeToString()


def _custom_op_onnx() -> bytes:
    model = _graph_model(
        [helper.make_node("Evil", ["input"], ["logits"], domain="com.example")],
        [],
        domain_opsets=("com.example",),
    )
    return model.SerializeToString()


def _loop_onnx() -> bytes:
    body = helper.make_graph(
        [helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 2]),
        ],
    )
    body.node.insert(0, helper.make_node("Identity", ["cond"], ["cond_out"]))
    model = _graph_model(
        [helper.make_node("Loop", ["M", "", "input"], ["logits"], body=body)],
        [numpy_helper.from_array(np.array(3, np.int64), "M")],
    )
    return model.SerializeToString()


def _nan_weights_onnx() -> bytes:
    w = np.ones((2, 2), np.float32)
    w[0, 1] = np.nan
    return mlp_onnx([w, np.eye(2)])


def _lying_dims_onnx() -> bytes:
    model = onnx.load_from_string(mlp_onnx([np.ones((3, 2)), np.ones((2, 3))]))
    t = model.graph.initializer[0]
    t.dims[:] = [300, 2]  # declares 600 floats, carries 6
    return model.SerializeToString()


BAD_UPLOADS = {
    "empty": lambda fx, good: b"",
    "garbage": lambda fx, good: b"\x08\x07garbage-that-is-not-protobuf\xff\xfe" * 10,
    "truncated-onnx": lambda fx, good: good[: len(good) // 2],
    "external-data": lambda fx, good: _external_data_onnx(),
    "custom-op": lambda fx, good: _custom_op_onnx(),
    "loop-op": lambda fx, good: _loop_onnx(),
    "nan-weights": lambda fx, good: _nan_weights_onnx(),
    "lying-dims": lambda fx, good: _lying_dims_onnx(),
    "pickle": lambda fx, good: (fx / "auto_lirpa" / "spectral_NOR_MLP_B.pth").read_bytes(),
    "raw-pickle": lambda fx, good: b"\x80\x04\x95" + b"\x00" * 20,
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_problem_json(client, fixtures_dir, rw_onnx, case) -> None:
    data = BAD_UPLOADS[case](fixtures_dir, rw_onnx)
    body = assert_problem(upload(client, data), 422)
    assert body["instance"] == "/v1/models"
    assert client.get("/v1/models").json()["models"] == []  # nothing stored
    assert client.get("/v2/health/ready").status_code == 200  # still serving


def test_oversize_upload_is_413_while_streaming(make_client, rw_onnx) -> None:
    client = make_client(max_upload_mb=0.01)  # ~10 KB

    def chunks():
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        for _ in range(100):
            yield b"\x00" * 4096

    # No Content-Length: the cap must trip while the body streams in.
    r = client.post(
        "/v1/models",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert_problem(r, 413, "payload-too-large")
    # With Content-Length: refused before reading.
    assert_problem(upload(client, b"\x08" * 20000), 413, "payload-too-large")
    assert upload(client, rw_onnx).status_code == 201  # small files still fine


def test_missing_file_field_and_routing_errors(client) -> None:
    body = assert_problem(client.post("/v1/models", data={"x": "1"}), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["body", "file"]
    assert_problem(client.post("/v1/models", json={"file": "x"}), 422, "validation-error")
    assert_problem(client.get("/no/such/route"), 404, "not-found")
    assert_problem(client.put("/v1/models"), 405, "method-not-allowed")
    assert_problem(client.get("/v1/models/0123456789abcdef"), 404, "model-not-found")


def test_api_key(make_client, rw_onnx) -> None:
    client = make_client(api_key="s3cret")
    assert_problem(client.get("/v1/models"), 401, "unauthorized")
    assert_problem(client.get("/v1/models", headers={"X-API-Key": "wrong"}), 401)
    assert_problem(client.get("/metrics"), 401)
    ok = {"X-API-Key": "s3cret"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    r = client.post("/v1/models", files={"file": ("m.onnx", rw_onnx)}, headers=ok)
    assert r.status_code == 201
    # health and docs stay open
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_parse_timeout_is_422(make_client, fixtures_dir) -> None:
    client = make_client(parse_timeout_s=0.001)
    data = (fixtures_dir / "vnncomp2021/benchmarks/mnistfc/mnist-net_256x6.onnx").read_bytes()
    assert_problem(upload(client, data), 422, "parse-timeout")
