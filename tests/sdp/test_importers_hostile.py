"""Importers under attack: each hostile or broken input is refused with its stable code, the
limits hold, and mutated files never crash or leak a third-party exception."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sdp.errors import ModelRejected, UnsupportedOp
from sdp.importers import Limits, detect_format, load_model, load_model_file, save_safetensors
from tests.sdp.importer_cases import (
    BENCH,
    cell,
    init,
    make_model,
    mat_bytes,
    st_bytes,
)


def test_mat_rejections() -> None:
    good = cell(np.ones((3, 2)), np.ones((1, 3)))
    cases = {
        "unsupported-content": mat_bytes(weights=good, s={"a": 1.0}),
        "malformed": mat_bytes(w=good),  # no 'weights'
        "shape-mismatch": mat_bytes(weights=cell(np.ones((3, 2)), np.ones((1, 4)))),
        "non-finite": mat_bytes(weights=cell(np.full((3, 2), np.nan))),
    }
    for code, data in cases.items():
        with pytest.raises(ModelRejected) as exc:
            load_model(data)
        assert exc.value.code == code, (code, exc.value)
    # a cell of strings is not a cell of numeric matrices
    with pytest.raises(ModelRejected) as exc:
        load_model(mat_bytes(weights=cell(np.array(["abc"]))))
    assert exc.value.code in ("unsupported-content", "malformed")


def test_mat_lying_cell_dims_and_zlib_bomb() -> None:
    data = bytearray(mat_bytes(weights=cell(np.ones((3, 2)), np.ones((1, 3)))))
    # the cell's dimensions subelement: 128-byte header, 8-byte tag, 16-byte flags, 8-byte tag
    assert struct.unpack_from("<2i", data, 128 + 32) == (1, 2)
    struct.pack_into("<2i", data, 128 + 32, 100_000, 100_000)
    with pytest.raises(ModelRejected) as exc:
        load_model(bytes(data))
    assert exc.value.code == "malformed"
    bomb = mat_bytes(True, weights=cell(np.zeros((2000, 2000))))
    assert len(bomb) < 200_000
    with pytest.raises(ModelRejected) as exc:
        load_model(bomb, limits=Limits(max_bytes=1 << 20))
    assert exc.value.code == "too-large"


# ---------------------------------------------------------------- hostile inputs
def _gemmmake_model(w: np.ndarray, in_shape: list, out_shape: list) -> bytes:
    return make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [init("w", w)],
        in_shape,
        out_shape,
        check=False,
    )


def _external_data() -> bytes:
    t = init("w", np.ones((2, 3)))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [t], [1, 3], [1, 2], check=False
    )


def _loop() -> bytes:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
    )
    return make_model(
        [helper.make_node("Loop", ["", ""], ["y"], body=body, name="the_loop")],
        [],
        [1, 2],
        [1, 2],
        check=False,
    )


def _lying_raw_data() -> bytes:
    t = init("w", np.ones((2, 3)))
    t.dims[:] = [2000, 3000]
    return make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [t],
        [1, 3000],
        [1, 2000],
        check=False,
    )


def _two_inputs() -> bytes:
    return make_model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [],
        [1, 2],
        [1, 2],
        extra_inputs=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])],
    )


def _square() -> bytes:
    return make_model([helper.make_node("Mul", ["x", "x"], ["y"])], [], [1, 2], [1, 2])


def _plain_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    return buf.getvalue()


HOSTILE = {
    "empty": lambda: b"",
    "unknown-format:text": lambda: b"this is not a model at all" * 20,
    "unknown-format:random-bytes": lambda: bytes(
        np.random.default_rng(3).integers(9, 256, 4096, dtype=np.uint8)
    ),
    "pickle-refused:dict": lambda: pickle.dumps({"weight": [1.0, 2.0]}),
    "pickle-refused:protocol-2": lambda: pickle.dumps([1, 2, 3], protocol=2),
    "external-data": _external_data,
    "custom-domain": lambda: make_model(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.example.evil")],
        [],
        [1, 2],
        [1, 2],
        check=False,
    ),
    "subgraph": _loop,
    "non-finite": lambda: _gemmmake_model(np.array([[1.0, np.nan]]), [1, 2], [1, 1]),
    "shape-mismatch:output": lambda: _gemmmake_model(np.ones((10, 784)), [1, 784], [1, 7]),
    "shape-mismatch:input": lambda: _gemmmake_model(np.ones((10, 784)), [1, 5], [1, 10]),
    "shape-mismatch:raw-data": _lying_raw_data,
    "unsupported-graph:two-inputs": _two_inputs,
    "unsupported-graph:square": _square,
    "too-wide:input": lambda: make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [], [1, 10**8], [1, 10**8]
    ),
    "unknown-format:plain-zip": _plain_zip,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs_are_rejected_with_codes(case: str) -> None:
    code = case.split(":")[0]
    with pytest.raises(ModelRejected) as exc:
        load_model(HOSTILE[case]())
    assert exc.value.code == code, str(exc.value)
    assert str(exc.value)


def test_pickle_fixture_refused_with_advice(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "auto_lirpa/spectral_NOR_MLP_B.pth").read_bytes()
    assert detect_format(data) == "pickle"
    with pytest.raises(ModelRejected) as exc:
        load_model(data)
    assert exc.value.code == "pickle-refused"
    assert "ONNX" in str(exc.value) and "safetensors" in str(exc.value)


def test_subgraph_and_unsupported_op_name_the_node() -> None:
    with pytest.raises(UnsupportedOp) as exc:
        load_model(_loop())
    assert exc.value.node == "the_loop" and exc.value.op == "Loop"
    data = make_model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], name="pool1")],
        [],
        [1, 1, 4, 4],
        [1, 1, 3, 3],
    )
    with pytest.raises(UnsupportedOp) as exc2:
        load_model(data)
    assert exc2.value.code == "unsupported-op"
    assert (exc2.value.node, exc2.value.op) == ("pool1", "MaxPool")
    assert "pool1" in str(exc2.value) and "MaxPool" in str(exc2.value)
    softmax = make_model(
        [
            helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
            helper.make_node("Softmax", ["h"], ["y"], name="probs"),
        ],
        [init("w", np.ones((3, 2)))],
        [1, 2],
        [1, 3],
    )
    with pytest.raises(UnsupportedOp) as exc3:
        load_model(softmax)
    assert exc3.value.node == "probs" and "logits" in str(exc3.value)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.02])
def test_truncated_onnx_is_malformed(fixtures_dir: Path, cut: float) -> None:
    data = (fixtures_dir / BENCH / "mnistfc/mnist-net_256x2.onnx").read_bytes()
    with pytest.raises(ModelRejected) as exc:
        load_model(data[: int(len(data) * cut)])
    assert exc.value.code == "malformed"


def test_limits(fixtures_dir: Path) -> None:
    path = fixtures_dir / BENCH / "mnistfc/mnist-net_256x4.onnx"
    cases = {
        "too-large": Limits(max_bytes=1000),
        "too-many-parameters": Limits(max_parameters=100_000),
        "too-wide": Limits(max_width=200),
        "too-deep": Limits(max_depth=5),
        "too-many-nodes": Limits(max_nodes=5),
    }
    for code, limits in cases.items():
        with pytest.raises(ModelRejected) as exc:
            load_model_file(path, limits=limits)
        assert exc.value.code == code
    assert (
        load_model_file(path, limits=Limits()).num_parameters
        == 785 * 256 + 3 * 257 * 256 + 257 * 10
    )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected) as exc:
        load_model_file(tmp_path / "missing.onnx")
    assert exc.value.code == "unreadable"


def test_safetensors_rejections() -> None:
    ok_cfg = {
        "kind": "feedforward",
        "input_shape": [2],
        "layers": [{"type": "dense", "weight": "w"}],
    }
    w = np.ones((3, 2))
    good = st_bytes({"w": w}, ok_cfg)
    assert load_model(good).output_size == 3
    # a header that lies about a tensor's size
    n = struct.unpack_from("<Q", good)[0]
    header = json.loads(good[8 : 8 + n])
    header["w"]["shape"] = [30000, 20000]
    h = json.dumps(header).encode()
    lying = struct.pack("<Q", len(h)) + h + good[8 + n :]
    cases = {
        "missing-config": st_bytes({"w": w}, None),
        "invalid-config": st_bytes({"w": w}, None, raw_meta="{not json"),
        "unsupported-kind": st_bytes({"w": w}, {**ok_cfg, "kind": "transformer"}),
        "missing-tensor": st_bytes({"v": w}, ok_cfg),
        "non-finite": st_bytes({"w": np.full((3, 2), np.inf)}, ok_cfg),
        "shape-mismatch": st_bytes({"w": np.ones((3, 5))}, ok_cfg),
        "too-many-parameters": lying,
    }
    for code, data in cases.items():
        with pytest.raises(ModelRejected) as exc:
            load_model(data)
        assert exc.value.code == code, (code, str(exc.value))
    bad_dtype = bytearray(st_bytes({"w": w.astype(np.float16)}, ok_cfg))
    bad_dtype[: len(bad_dtype)] = bytes(bad_dtype).replace(b'"F16"', b'"BF9"')  # same length
    with pytest.raises(ModelRejected) as exc:
        load_model(bytes(bad_dtype))
    assert exc.value.code == "unsupported-dtype"


@pytest.mark.parametrize("kind", ["onnx", "mat", "safetensors"])
def test_mutated_files_load_or_are_rejected_cleanly(fixtures_dir: Path, kind: str) -> None:
    """Random byte flips and truncations: every outcome is a Network or a ModelRejected from
    our own checks (never a crash, never the catch-all for unforeseen parser errors)."""
    if kind == "onnx":
        src = (fixtures_dir / BENCH / "test/test_small.onnx").read_bytes()
    elif kind == "mat":
        src = (fixtures_dir / "lipsdp/random_weights.mat").read_bytes()
    else:
        src = save_safetensors(load_model_file(fixtures_dir / "lipsdp/random_weights.mat"))
    rng = np.random.default_rng(11)
    for _ in range(300):
        data = bytearray(src)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(len(data)))]
        try:
            net = load_model(bytes(data))
        except ModelRejected as exc:
            assert "could not be imported" not in str(exc), str(exc)
        else:
            assert np.all(np.isfinite(net.forward(np.zeros(net.input_size))))


def _mutate(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """One structural edit: an int attribute, a declared dim, a deleted node, a rewired input,
    transposed weight dims, or a swapped op type."""
    g = model.graph
    r = int(rng.integers(6))
    node = g.node[int(rng.integers(len(g.node)))]
    if r == 0:
        ints = [a for a in node.attribute if a.type == onnx.AttributeProto.INT]
        if ints:
            ints[int(rng.integers(len(ints)))].i = int(rng.integers(-3, 5))
    elif r == 1:
        v = [*g.input, *g.output][int(rng.integers(len(g.input) + len(g.output)))]
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[int(rng.integers(len(dims)))].dim_value = int(rng.integers(0, 40))
    elif r == 2 and len(g.node) > 1:
        del g.node[int(rng.integers(len(g.node)))]
    elif r == 3 and len(node.input):
        names = [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
        node.input[int(rng.integers(len(node.input)))] = names[int(rng.integers(len(names)))]
    elif r == 4 and len(g.initializer):
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        t.dims[:] = list(reversed(t.dims))
    else:
        ops = ["Relu", "Add", "Sub", "Mul", "Gemm", "MatMul", "Flatten", "Identity", "Sigmoid"]
        node.op_type = ops[int(rng.integers(len(ops)))]


def test_mutated_graphs_agree_with_onnxruntime(fixtures_dir: Path) -> None:
    """Differential check: whenever a structurally mutated model loads, onnxruntime accepts it
    too and computes the same function (float32 tolerance)."""
    sources = [
        onnx.load(str(fixtures_dir / BENCH / rel))
        for rel in (
            "test/test_small.onnx",
            "acasxu/ACASXU_run2a_1_1_batch_2000.onnx",
            "eran/nets/ffnnSIGMOID__Point_6x200.onnx",
            "mnistfc/mnist-net_256x2.onnx",
        )
    ]
    rng = np.random.default_rng(2024)
    loaded = 0
    for _ in range(120):
        model = onnx.ModelProto()
        model.CopyFrom(sources[int(rng.integers(len(sources)))])
        for _ in range(int(rng.integers(1, 3))):
            _mutate(model, rng)
        data = model.SerializeToString()
        try:
            net = load_model(data)
        except ModelRejected as exc:
            assert "could not be imported" not in str(exc), str(exc)
            continue
        loaded += 1
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
        x = rng.uniform(0, 1, shape).astype(np.float32)
        want = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64).ravel()
        got = net.forward(x.astype(np.float64).ravel()).ravel()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))
    assert loaded >= 10  # the mutations leave enough valid models to make the check meaningful
