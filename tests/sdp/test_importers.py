"""Importers: every real fixture against onnxruntime, the LipSDP .mat files, hand-built ONNX
graphs exercising each converter, and exact safetensors round trips."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.io as sio
from onnx import helper, numpy_helper

from sdp.importers import Limits, detect_format, load_model, load_model_file, save_safetensors
from sdp.ir import Activation, Conv2d, Dense, Network, Residual
from tests.sdp.importer_cases import (
    BENCH,
    ONNX_FIXTURES,
    as_float64_model,
    assert_matches_ort,
    cell,
    init,
    input_shape,
    make_model,
    mat_bytes,
    ort_run,
    rng_w,
    st_bytes,
)


# ---------------------------------------------------------------- real fixtures vs onnxruntime
def test_every_fixture_is_listed(fixtures_dir: Path) -> None:
    found = {
        str(p.relative_to(fixtures_dir / BENCH)) for p in (fixtures_dir / BENCH).rglob("*.onnx")
    }
    assert found == set(ONNX_FIXTURES)


@pytest.mark.parametrize("rel", ONNX_FIXTURES)
def test_fixture_matches_onnxruntime(fixtures_dir: Path, rel: str) -> None:
    """float32 onnxruntime vs the float64 IR: 1e-5 relative (the float32 rounding budget)."""
    path = fixtures_dir / BENCH / rel
    net = load_model_file(path)
    assert net.name == path.stem
    shape = input_shape(path)
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
    x = np.random.default_rng(zlib.crc32(rel.encode())).standard_normal((3, *input_shape(path)))
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


@pytest.mark.parametrize("compress", [False, True])
def test_mat_with_biases_and_content_sniffing(tmp_path: Path, compress: bool) -> None:
    w0, w1 = np.arange(6.0).reshape(3, 2), np.ones((1, 3))
    data = mat_bytes(compress, weights=cell(w0, w1), biases=cell(np.ones(3), np.zeros(1)))
    (tmp_path / "model.onnx").write_bytes(data)  # the extension lies; content decides
    net = load_model_file(tmp_path / "model.onnx")
    x = np.array([[1.0, -2.0]])
    np.testing.assert_allclose(net.forward(x), np.maximum(x @ w0.T + 1, 0) @ w1.T)


# ---------------------------------------------------------------- pure-Python MAT5 reader
def test_mat_reader_equals_scipy(fixtures_dir: Path) -> None:
    from sdp.importers.mat import read_mat5

    rng = np.random.default_rng(5)
    made = [
        mat_bytes(c, weights=cell(rng.standard_normal((4, 3)).astype(t), np.eye(2, 4)))
        for c in (False, True)
        for t in (np.float64, np.float32, np.int16)
    ]
    made.append(mat_bytes(weights=cell(np.arange(5.0).reshape(5, 1)).T))  # column cell
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


def _normalised_conv(pad: int) -> bytes:
    mean, std = np.array([0.4, 0.5, 0.6]).reshape(1, 3, 1, 1), np.array([0.2, 0.25, 0.3])
    return make_model(
        [
            helper.make_node("Sub", ["x", "mean"], ["a"]),
            helper.make_node("Div", ["a", "std"], ["b"]),
            helper.make_node("Conv", ["b", "w", "c"], ["h"], pads=[pad] * 4, strides=[1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "c2"], ["y"], transB=1),
        ],
        [
            init("mean", mean),
            init("std", std.reshape(1, 3, 1, 1)),
            init("w", rng_w(4, 3, 3, 3)),
            init("c", rng_w(4)),
            init("w2", rng_w(5, 4 * (6 - 2 + 2 * pad) ** 2)),
            init("c2", rng_w(5)),
        ],
        [1, 3, 6, 6],
        [1, 5],
    )


def _bn_pool() -> bytes:
    c = 4
    return make_model(
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
            init("w", rng_w(c, 2, 3, 3)),
            init("s", rng_w(c) + 2),
            init("b", rng_w(c)),
            init("m", rng_w(c)),
            init("v", np.abs(rng_w(c)) + 0.5),
            init("wd", rng_w(c, 1, 2, 2)),
        ],
        [1, 2, 8, 8],
        [1, c],
    )


def _nhwc_transpose_conv() -> bytes:
    return make_model(
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
            init("w", rng_w(3, 2, 3, 3)),
            numpy_helper.from_array(np.array([1, -1]), "shape"),
            init("w2", rng_w(3 * 3 * 3, 4)),
            init("b2", rng_w(4)),
        ],
        [1, 5, 5, 2],
        [1, 4],
    )


def _torch_flatten_pattern() -> bytes:
    """x.view(x.size(0), -1) as exported by torch: Shape/Gather/Unsqueeze/Concat/Reshape."""
    return make_model(
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
            init("two", np.float32(2.0)),
            init("w", rng_w(12, 6)),
            init("w3", rng_w(2, 6)),
        ],
        [1, 3, 2, 2],
        [2, 1],
    )


def _residual_sub_and_weight_left() -> bytes:
    return make_model(
        [
            helper.make_node("MatMul", ["w", "x"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["s"]),
            helper.make_node("MatMul", ["w2", "s"], ["b"]),
            helper.make_node("Sub", ["b", "a"], ["d"]),  # residual difference of two branches
            helper.make_node("Mul", ["d", "k"], ["e"]),
            helper.make_node("Add", ["e", "bias"], ["y"]),
        ],
        [
            init("w", rng_w(4, 3)),
            init("w2", rng_w(4, 4)),
            init("k", rng_w(4)),
            init("bias", rng_w(4)),
        ],
        [3],
        [4],
    )


def _reduce_mean() -> bytes:
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("Gemm", ["m", "w2"], ["g"], transB=1),
            helper.make_node("ReduceSum", ["g", "ax"], ["y"], keepdims=1),
        ],
        [
            init("w", rng_w(4, 2, 3, 3)),
            init("w2", rng_w(3, 4)),
            numpy_helper.from_array(np.array([1]), "ax"),
        ],
        [1, 2, 5, 5],
        [1, 1],
    )


BUILT = {
    "reduce-mean-sum": _reduce_mean,
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
    net = load_model(st_bytes({"c": w, "d": d, "db": np.ones(3, dtype=np.float32)}, config))
    x = np.random.default_rng(0).standard_normal((2, 12))
    want = Activation("leaky_relu", 0.1)(conv.apply(x)) @ d.T.astype(np.float64) + 1
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-12)


def test_onnx_sniffed_by_content_even_with_fields_out_of_order(fixtures_dir: Path) -> None:
    """Exporters write ir_version first (byte 0x08), but protobuf allows any field order."""
    model = onnx.load(str(fixtures_dir / BENCH / "test/test_small.onnx"))
    graph = model.graph.SerializeToString()
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    n, varint = len(graph), b""
    while True:
        varint += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            break
    data = b"\x3a" + varint + graph + rest.SerializeToString()  # field 7 (graph) first
    assert data[0] != 0x08 and detect_format(data) == "onnx"
    net = load_model(data)
    assert (
        net.content_hash()
        == load_model_file(fixtures_dir / BENCH / "test/test_small.onnx").content_hash()
    )
