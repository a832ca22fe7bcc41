"""Importers: real fixtures against onnxruntime, hand-built ONNX/safetensors/.mat edge cases,
and a matrix of hostile inputs that must each be refused with a stable code."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.io as sio
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as st_save

from sdp.errors import ModelRejected, UnsupportedOp
from sdp.importers import Limits, detect_format, load_model, load_model_file, save_safetensors
from sdp.ir import Activation, Conv2d, Dense, Network, Residual

BENCH = "vnncomp2021/benchmarks"
ONNX_FIXTURES = [
    "acasxu/ACASXU_run2a_1_1_batch_2000.onnx",
    "acasxu/ACASXU_run2a_1_2_batch_2000.onnx",
    "cifar10_resnet/onnx/resnet_2b.onnx",
    "cifar10_resnet/onnx/resnet_4b.onnx",
    "eran/nets/ffnnSIGMOID__Point_6x200.onnx",
    "eran/nets/mnist_relu_9_200.onnx",
    "mnistfc/mnist-net_256x2.onnx",
    "mnistfc/mnist-net_256x4.onnx",
    "mnistfc/mnist-net_256x6.onnx",
    "oval21/nets/cifar_base_kw.onnx",
    "oval21/nets/cifar_deep_kw.onnx",
    "oval21/nets/cifar_wide_kw.onnx",
    "test/test_nano.onnx",
    "test/test_sat.onnx",
    "test/test_small.onnx",
    "test/test_tiny.onnx",
    "test/test_unsat.onnx",
]


def ort_run(model: bytes | str, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def assert_matches_ort(net: Network, model: bytes | str, x: np.ndarray) -> None:
    """IR forward (float64 on the float32 input) vs onnxruntime, 1e-5 relative."""
    x32 = x.astype(np.float32)
    want = ort_run(model, x32).astype(np.float64).ravel()
    got = net.forward(x32.astype(np.float64).reshape(-1)).ravel()
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------- real fixtures vs onnxruntime
def test_every_fixture_is_listed(fixtures_dir: Path) -> None:
    found = {
        str(p.relative_to(fixtures_dir / BENCH)) for p in (fixtures_dir / BENCH).rglob("*.onnx")
    }
    assert found == set(ONNX_FIXTURES)


def as_float64_model(path: Path) -> bytes:
    """The same ONNX model with float64 weights and I/O, so onnxruntime computes in double."""
    model = onnx.load(str(path))
    g = model.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                arr = numpy_helper.to_array(a.t).astype(np.float64)
                a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    return model.SerializeToString()


def _input_shape(path: Path) -> list[int]:
    dims = ort.InferenceSession(str(path)).get_inputs()[0].shape
    return [d if isinstance(d, int) else 1 for d in dims]


@pytest.mark.parametrize("rel", ONNX_FIXTURES)
def test_fixture_matches_onnxruntime(fixtures_dir: Path, rel: str) -> None:
    """float32 onnxruntime vs the float64 IR: 1e-5 relative (the float32 rounding budget)."""
    path = fixtures_dir / BENCH / rel
    net = load_model_file(path)
    assert net.name == path.stem
    shape = _input_shape(path)
    rng = np.random.default_rng(zlib.crc32(rel.encode()))
    trials = 2 if net.kind in ("conv", "residual") else 4
    for k in range(trials):
        x = rng.uniform(0, 1, shape) if k % 2 == 0 else 0.5 * rng.standard_normal(shape)
        assert_matches_ort(net, str(path), x)


@pytest.mark.parametrize("rel", [r for r in ONNX_FIXTURES if "cifar" not in r])
def test_dense_fixture_matches_onnxruntime_in_float64(fixtures_dir: Path, rel: str) -> None:
    """onnxruntime has double kernels for the dense ops: then the IR agrees to ~1e-13."""
    path = fixtures_dir / BENCH / rel
    net = load_model_file(path)
    model = as_float64_model(path)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(zlib.crc32(rel.encode())).standard_normal((3, *_input_shape(path)))
    for xi in x:
        want = sess.run(None, {sess.get_inputs()[0].name: xi})[0].ravel()
        got = net.forward(xi.ravel())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * max(1.0, np.abs(want).max()))


def test_fixture_structure(fixtures_dir: Path) -> None:
    def load(rel: str) -> Network:
        return load_model_file(fixtures_dir / BENCH / rel)

    mnist = load("mnistfc/mnist-net_256x2.onnx")
    assert mnist.input_shape == (784, 1) and mnist.kind == "feedforward"
    assert [op.weight.shape for op in mnist.ops if isinstance(op, Dense)] == [
        (256, 784),
        (256, 256),
        (10, 256),
    ]
    # ERAN relu net ends with a Relu: the chain gets an identity output layer
    eran = load("eran/nets/mnist_relu_9_200.onnx")
    assert eran.input_shape == (1, 28, 28) and isinstance(eran.ops[-1], Activation)
    ch = eran.chain()
    assert len(ch.activations) == 9
    np.testing.assert_array_equal(ch.affines[-1].matrix(), np.eye(10))
    # ERAN sigmoid: Sub/Div normalisation folded into the first Gemm (no extra layer)
    sig = load("eran/nets/ffnnSIGMOID__Point_6x200.onnx")
    assert sum(isinstance(op, Dense) for op in sig.ops) == 7
    assert isinstance(sig.ops[0], Dense) and sig.ops[0].weight.shape == (200, 784)
    acas = load("acasxu/ACASXU_run2a_1_1_batch_2000.onnx")
    assert acas.input_shape == (1, 1, 5) and sum(isinstance(op, Dense) for op in acas.ops) == 7
    assert load("test/test_small.onnx").input_shape == (1,)
    res = load("cifar10_resnet/onnx/resnet_2b.onnx")
    assert res.kind == "residual" and sum(isinstance(op, Residual) for op in res.ops) == 2
    oval = load("oval21/nets/cifar_base_kw.onnx")
    assert oval.input_shape == (3, 32, 32) and isinstance(oval.ops[0], Conv2d)
    assert oval.ops[0].stride == (2, 2) and oval.ops[0].padding == (1, 1, 1, 1)


# ---------------------------------------------------------------- LipSDP .mat
def test_lipsdp_mat_weights(fixtures_dir: Path) -> None:
    path = fixtures_dir / "lipsdp/random_weights.mat"
    net = load_model_file(path)
    ws = sio.loadmat(path)["weights"].ravel()
    assert [op.weight.shape for op in net.ops if isinstance(op, Dense)] == [
        (10, 2),
        (30, 10),
        (20, 30),
        (2, 20),
    ]
    assert net.input_shape == (2,) and net.output_size == 2
    x = np.random.default_rng(0).standard_normal((7, 2))
    y = x
    for k, w in enumerate(ws):
        y = y @ w.T
        y = np.maximum(y, 0) if k < len(ws) - 1 else y
    np.testing.assert_allclose(net.forward(x), y, rtol=1e-13)
    mnist = load_model_file(fixtures_dir / "lipsdp/mnist_weights.mat")
    assert mnist.input_shape == (784,) and mnist.chain().hidden_sizes == [50]


def _mat_bytes(compress: bool = False, **variables: object) -> bytes:
    buf = io.BytesIO()
    sio.savemat(buf, variables, do_compression=compress)
    return buf.getvalue()


def _cell(*arrays: np.ndarray) -> np.ndarray:
    c = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        c[0, i] = a
    return c


@pytest.mark.parametrize("compress", [False, True])
def test_mat_with_biases_and_content_sniffing(tmp_path: Path, compress: bool) -> None:
    w0, w1 = np.arange(6.0).reshape(3, 2), np.ones((1, 3))
    data = _mat_bytes(compress, weights=_cell(w0, w1), biases=_cell(np.ones(3), np.zeros(1)))
    (tmp_path / "model.onnx").write_bytes(data)  # the extension lies; content decides
    net = load_model_file(tmp_path / "model.onnx")
    x = np.array([[1.0, -2.0]])
    np.testing.assert_allclose(net.forward(x), np.maximum(x @ w0.T + 1, 0) @ w1.T)


def test_mat_rejections() -> None:
    good = _cell(np.ones((3, 2)), np.ones((1, 3)))
    cases = {
        "unsupported-content": _mat_bytes(weights=good, s={"a": 1.0}),
        "malformed": _mat_bytes(w=good),  # no 'weights'
        "shape-mismatch": _mat_bytes(weights=_cell(np.ones((3, 2)), np.ones((1, 4)))),
        "non-finite": _mat_bytes(weights=_cell(np.full((3, 2), np.nan))),
    }
    for code, data in cases.items():
        with pytest.raises(ModelRejected) as exc:
            load_model(data)
        assert exc.value.code == code, (code, exc.value)
    # a cell of strings is not a cell of numeric matrices
    with pytest.raises(ModelRejected) as exc:
        load_model(_mat_bytes(weights=_cell(np.array(["abc"]))))
    assert exc.value.code in ("unsupported-content", "malformed")


def test_mat_lying_cell_dims_and_zlib_bomb() -> None:
    data = bytearray(_mat_bytes(weights=_cell(np.ones((3, 2)), np.ones((1, 3)))))
    # the cell's dimensions subelement: 128-byte header, 8-byte tag, 16-byte flags, 8-byte tag
    assert struct.unpack_from("<2i", data, 128 + 32) == (1, 2)
    struct.pack_into("<2i", data, 128 + 32, 100_000, 100_000)
    with pytest.raises(ModelRejected) as exc:
        load_model(bytes(data))
    assert exc.value.code == "malformed"
    bomb = _mat_bytes(True, weights=_cell(np.zeros((2000, 2000))))
    assert len(bomb) < 200_000
    with pytest.raises(ModelRejected) as exc:
        load_model(bomb, limits=Limits(max_bytes=1 << 20))
    assert exc.value.code == "too-large"


# ---------------------------------------------------------------- hand-built ONNX models
def _init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def _model(
    nodes: list,
    inits: list,
    in_shape: list,
    out_shape: list | None,
    opset: int = 13,
    extra_inputs: list | None = None,
    extra_outputs: list | None = None,
    check: bool = True,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape), *(extra_inputs or [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape), *(extra_outputs or [])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model.SerializeToString()


def _rng_w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _normalised_conv(pad: int) -> bytes:
    mean, std = np.array([0.4, 0.5, 0.6]).reshape(1, 3, 1, 1), np.array([0.2, 0.25, 0.3])
    return _model(
        [
            helper.make_node("Sub", ["x", "mean"], ["a"]),
            helper.make_node("Div", ["a", "std"], ["b"]),
            helper.make_node("Conv", ["b", "w", "c"], ["h"], pads=[pad] * 4, strides=[1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "c2"], ["y"], transB=1),
        ],
        [
            _init("mean", mean),
            _init("std", std.reshape(1, 3, 1, 1)),
            _init("w", _rng_w(4, 3, 3, 3)),
            _init("c", _rng_w(4)),
            _init("w2", _rng_w(5, 4 * (6 - 2 + 2 * pad) ** 2)),
            _init("c2", _rng_w(5)),
        ],
        [1, 3, 6, 6],
        [1, 5],
    )


def _bn_pool() -> bytes:
    c = 4
    return _model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], pads=[0, 1, 1, 0], group=1),
            helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
            helper.make_node("LeakyRelu", ["n"], ["r"], alpha=0.2),
            helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node(
                "Conv", ["p", "wd"], ["q"], group=c, pads=[1, 1, 1, 1], dilations=[2, 2]
            ),
            helper.make_node("Elu", ["q"], ["e"], alpha=0.5),
            helper.make_node("GlobalAveragePool", ["e"], ["g"]),
            helper.make_node("Flatten", ["g"], ["y"]),
        ],
        [
            _init("w", _rng_w(c, 2, 3, 3)),
            _init("s", _rng_w(c) + 2),
            _init("b", _rng_w(c)),
            _init("m", _rng_w(c)),
            _init("v", np.abs(_rng_w(c)) + 0.5),
            _init("wd", _rng_w(c, 1, 2, 2)),
        ],
        [1, 2, 8, 8],
        [1, c],
    )


def _nhwc_transpose_conv() -> bytes:
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["t", "w"], ["h"], auto_pad="SAME_UPPER", strides=[2, 2]),
            helper.make_node("Tanh", ["h"], ["a"]),
            helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["at", "shape"], ["f"]),
            helper.make_node("MatMul", ["f", "w2"], ["m"]),
            helper.make_node("Add", ["m", "b2"], ["y"]),
        ],
        [
            _init("w", _rng_w(3, 2, 3, 3)),
            numpy_helper.from_array(np.array([1, -1]), "shape"),
            _init("w2", _rng_w(3 * 3 * 3, 4)),
            _init("b2", _rng_w(4)),
        ],
        [1, 5, 5, 2],
        [1, 4],
    )


def _torch_flatten_pattern() -> bytes:
    """x.view(x.size(0), -1) as exported by torch: Shape/Gather/Unsqueeze/Concat/Reshape."""
    return _model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["f"]),
            helper.make_node("Mul", ["f", "two"], ["f2"]),
            helper.make_node("Gemm", ["f2", "w"], ["g"], alpha=0.5, beta=2.0, transA=0),
            helper.make_node("Softplus", ["g"], ["h"]),
            helper.make_node("Gemm", ["w3", "h"], ["y"], transB=1),
        ],
        [
            numpy_helper.from_array(np.array(0), "zero"),
            numpy_helper.from_array(np.array([0]), "ax"),
            numpy_helper.from_array(np.array([-1]), "minus1"),
            _init("two", np.float32(2.0)),
            _init("w", _rng_w(12, 6)),
            _init("w3", _rng_w(2, 6)),
        ],
        [1, 3, 2, 2],
        [2, 1],
    )


def _residual_sub_and_weight_left() -> bytes:
    return _model(
        [
            helper.make_node("MatMul", ["w", "x"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["s"]),
            helper.make_node("MatMul", ["w2", "s"], ["b"]),
            helper.make_node("Sub", ["b", "a"], ["d"]),  # residual difference of two branches
            helper.make_node("Mul", ["d", "k"], ["e"]),
            helper.make_node("Add", ["e", "bias"], ["y"]),
        ],
        [
            _init("w", _rng_w(4, 3)),
            _init("w2", _rng_w(4, 4)),
            _init("k", _rng_w(4)),
            _init("bias", _rng_w(4)),
        ],
        [3],
        [4],
    )


BUILT = {
    "normalise-conv-pad": lambda: _normalised_conv(1),
    "normalise-conv-nopad": lambda: _normalised_conv(0),
    "bn-pool-dilated-depthwise": _bn_pool,
    "nhwc-transpose": _nhwc_transpose_conv,
    "torch-flatten-pattern": _torch_flatten_pattern,
    "residual-sub-weight-left": _residual_sub_and_weight_left,
}


@pytest.mark.parametrize("case", sorted(BUILT))
def test_built_models_match_onnxruntime(case: str) -> None:
    data = BUILT[case]()
    net = load_model(data)
    shape = [
        d.dim_value for d in onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim
    ]
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.uniform(-1, 1, shape)
        if case != "nhwc-transpose":
            assert_matches_ort(net, data, x)
            continue
        # a Transpose of the raw input is absorbed: the IR input takes the NCHW layout
        want = ort_run(data, x.astype(np.float32)).ravel()
        got = net.forward(x.astype(np.float32).astype(np.float64).transpose(0, 3, 1, 2).ravel())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))


def test_normalisation_folding_is_free_when_exact() -> None:
    # no padding: per-channel Sub/Div fold into the conv itself
    folded = load_model(_normalised_conv(0))
    assert [type(op).__name__ for op in folded.ops] == ["Conv2d", "Activation", "Dense"]
    # zero padding: a shift cannot fold exactly, so a depthwise 1x1 conv carries it
    padded = load_model(_normalised_conv(1))
    assert [type(op).__name__ for op in padded.ops] == ["Conv2d", "Conv2d", "Activation", "Dense"]
    assert padded.ops[0].groups == 3 and padded.ops[0].weight.shape == (3, 1, 1, 1)
    assert load_model(_nhwc_transpose_conv()).input_shape == (2, 5, 5)


# ---------------------------------------------------------------- hostile inputs
def _gemm_model(w: np.ndarray, in_shape: list, out_shape: list) -> bytes:
    return _model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [_init("w", w)],
        in_shape,
        out_shape,
        check=False,
    )


def _external_data() -> bytes:
    t = _init("w", np.ones((2, 3)))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    return _model(
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
    return _model(
        [helper.make_node("Loop", ["", ""], ["y"], body=body, name="the_loop")],
        [],
        [1, 2],
        [1, 2],
        check=False,
    )


def _lying_raw_data() -> bytes:
    t = _init("w", np.ones((2, 3)))
    t.dims[:] = [2000, 3000]
    return _model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [t],
        [1, 3000],
        [1, 2000],
        check=False,
    )


def _two_inputs() -> bytes:
    return _model(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        [],
        [1, 2],
        [1, 2],
        extra_inputs=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])],
    )


def _square() -> bytes:
    return _model([helper.make_node("Mul", ["x", "x"], ["y"])], [], [1, 2], [1, 2])


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
    "custom-domain": lambda: _model(
        [helper.make_node("Foo", ["x"], ["y"], domain="com.example.evil")],
        [],
        [1, 2],
        [1, 2],
        check=False,
    ),
    "subgraph": _loop,
    "non-finite": lambda: _gemm_model(np.array([[1.0, np.nan]]), [1, 2], [1, 1]),
    "shape-mismatch:output": lambda: _gemm_model(np.ones((10, 784)), [1, 784], [1, 7]),
    "shape-mismatch:input": lambda: _gemm_model(np.ones((10, 784)), [1, 5], [1, 10]),
    "shape-mismatch:raw-data": _lying_raw_data,
    "unsupported-graph:two-inputs": _two_inputs,
    "unsupported-graph:square": _square,
    "too-wide:input": lambda: _model(
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
    data = _model(
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


# ---------------------------------------------------------------- safetensors
def test_safetensors_roundtrip_is_exact(fixtures_dir: Path, tmp_path: Path) -> None:
    for rel in ("cifar10_resnet/onnx/resnet_2b.onnx", "eran/nets/mnist_relu_9_200.onnx"):
        net = load_model_file(fixtures_dir / BENCH / rel)
        data = save_safetensors(net, tmp_path / "m.safetensors")
        assert (tmp_path / "m.safetensors").read_bytes() == data
        back = load_model(data)
        assert back.content_hash() == net.content_hash() and back.name == net.name
        x = np.random.default_rng(0).standard_normal((2, net.input_size))
        np.testing.assert_array_equal(back.forward(x), net.forward(x))


def _st(tensors: dict, config: object | None, raw_meta: str | None = None) -> bytes:
    meta = (
        None
        if config is None and raw_meta is None
        else {"lipcert": raw_meta if raw_meta is not None else json.dumps(config)}
    )
    return st_save(tensors, metadata=meta)


def test_safetensors_hand_written_config() -> None:
    w = np.arange(12.0).reshape(2, 1, 2, 3)
    config = {
        "format": "lipcert/1",
        "kind": "feedforward",
        "input_shape": [1, 3, 4],
        "layers": [
            {"type": "conv2d", "weight": "c", "padding": [1, 0], "stride": 1},
            {"type": "activation", "name": "leaky_relu", "param": 0.1},
            {"type": "flatten"},
            {"type": "dense", "weight": "d", "bias": "db"},
        ],
    }
    conv = Conv2d(w, np.zeros(2), (1, 3, 4), padding=(1, 0, 1, 0))
    d = np.ones((3, conv.out_features), dtype=np.float32)
    net = load_model(_st({"c": w, "d": d, "db": np.ones(3, dtype=np.float32)}, config))
    x = np.random.default_rng(0).standard_normal((2, 12))
    want = Activation("leaky_relu", 0.1)(conv.apply(x)) @ d.T.astype(np.float64) + 1
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-12)


def test_safetensors_rejections() -> None:
    ok_cfg = {
        "kind": "feedforward",
        "input_shape": [2],
        "layers": [{"type": "dense", "weight": "w"}],
    }
    w = np.ones((3, 2))
    good = _st({"w": w}, ok_cfg)
    assert load_model(good).output_size == 3
    # a header that lies about a tensor's size
    n = struct.unpack_from("<Q", good)[0]
    header = json.loads(good[8 : 8 + n])
    header["w"]["shape"] = [30000, 20000]
    h = json.dumps(header).encode()
    lying = struct.pack("<Q", len(h)) + h + good[8 + n :]
    cases = {
        "missing-config": _st({"w": w}, None),
        "invalid-config": _st({"w": w}, None, raw_meta="{not json"),
        "unsupported-kind": _st({"w": w}, {**ok_cfg, "kind": "transformer"}),
        "missing-tensor": _st({"v": w}, ok_cfg),
        "non-finite": _st({"w": np.full((3, 2), np.inf)}, ok_cfg),
        "shape-mismatch": _st({"w": np.ones((3, 5))}, ok_cfg),
        "too-many-parameters": lying,
    }
    for code, data in cases.items():
        with pytest.raises(ModelRejected) as exc:
            load_model(data)
        assert exc.value.code == code, (code, str(exc.value))
    bad_dtype = bytearray(_st({"w": w.astype(np.float16)}, ok_cfg))
    bad_dtype[: len(bad_dtype)] = bytes(bad_dtype).replace(b'"F16"', b'"BF9"')  # same length
    with pytest.raises(ModelRejected) as exc:
        load_model(bytes(bad_dtype))
    assert exc.value.code == "unsupported-dtype"


# ---------------------------------------------------------------- pure-Python MAT5 reader
def test_mat_reader_equals_scipy(fixtures_dir: Path) -> None:
    from sdp.importers.mat import read_mat5

    rng = np.random.default_rng(5)
    made = [
        _mat_bytes(c, weights=_cell(rng.standard_normal((4, 3)).astype(t), np.eye(2, 4)))
        for c in (False, True)
        for t in (np.float64, np.float32, np.int16)
    ]
    made.append(_mat_bytes(weights=_cell(np.arange(5.0).reshape(5, 1)).T))  # column cell
    files = [
        (fixtures_dir / f"lipsdp/{n}.mat").read_bytes() for n in ("random_weights", "mnist_weights")
    ]
    for data in files + made:
        want = sio.loadmat(io.BytesIO(data))["weights"].ravel()
        got = read_mat5(data, Limits())[0]["weights"].ravel()
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_array_equal(g, w.astype(np.float64))


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
