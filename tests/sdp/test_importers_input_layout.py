"""An ONNX input Transpose absorbed by the importer: the IR keeps the file's layout on the side.

onnxruntime is the oracle: inputs in the file's layout, mapped by ``Network.ir_inputs``, give
its logits; the content hash (what certificates name) is that of the IR alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdp.importers import load_model
from sdp.ir import Activation, Conv2d, Dense, InputLayout, Network

RNG = np.random.default_rng(11)
W_CONV = RNG.normal(size=(2, 3, 3, 3)).astype(np.float32)
B_CONV = RNG.normal(size=2).astype(np.float32)
W_HEAD = RNG.normal(size=(3, 2 * 4 * 5)).astype(np.float32)
B_HEAD = RNG.normal(size=3).astype(np.float32)


def conv_net_onnx(*, nhwc: bool) -> bytes:
    """[N, 4, 5, 3] -> Transpose(0, 3, 1, 2) -> Conv(3x3, pad 1) -> Relu -> Flatten -> Gemm;
    ``nhwc=False``: the same network on an NCHW input [N, 3, 4, 5] without the Transpose."""
    nodes = [
        helper.make_node("Conv", ["t" if nhwc else "x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1),
    ]
    if nhwc:
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]))
    inits = [
        numpy_helper.from_array(W_CONV, "w"),
        numpy_helper.from_array(B_CONV, "b"),
        numpy_helper.from_array(W_HEAD, "w2"),
        numpy_helper.from_array(B_HEAD, "b2"),
    ]
    shape = [None, 4, 5, 3] if nhwc else [None, 3, 4, 5]
    graph = helper.make_graph(
        nodes,
        "nhwc" if nhwc else "nchw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_logits(data: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x.astype(np.float32)})[0], dtype=np.float64)


def test_importer_records_the_files_layout_and_ir_inputs_match_onnxruntime() -> None:
    data = conv_net_onnx(nhwc=True)
    net = load_model(data)
    assert net.input_shape == (3, 4, 5)
    assert net.input_layout == InputLayout((4, 5, 3), (2, 0, 1))
    assert net.file_input_shape == (4, 5, 3)
    x = np.random.default_rng(0).uniform(-1, 1, (6, 4, 5, 3)).astype(np.float32)
    want = ort_logits(data, x)
    x64 = x.astype(np.float64)
    for rows in (x64, x64.reshape(6, -1)):  # shaped and flat rows, both in the file's layout
        got = net.forward(net.ir_inputs(rows))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(net.ir_inputs(x64), x64.transpose(0, 3, 1, 2).reshape(6, -1))
    # read as if already in the IR layout, the same numbers are another image
    wrong = net.forward(x64.reshape(6, -1))
    assert np.abs(wrong - want).max() > 0.1 * np.abs(want).max()


def test_layout_is_not_in_the_content_hash() -> None:
    """The hash names the IR function: the NHWC file and its NCHW twin give one IR and one
    hash; a network without a layout hashes as before this field existed."""
    nhwc, nchw = load_model(conv_net_onnx(nhwc=True)), load_model(conv_net_onnx(nhwc=False))
    assert nchw.input_layout is None and nchw.file_input_shape == nchw.input_shape == (3, 4, 5)
    assert nhwc.content_hash() == nchw.content_hash()
    x = np.random.default_rng(1).normal(size=(4, 3, 4, 5))
    np.testing.assert_allclose(
        nhwc.forward(x.reshape(4, -1)), nchw.forward(x.reshape(4, -1)), rtol=0, atol=0
    )
    assert Network(nhwc.input_shape, nhwc.ops).content_hash() == nhwc.content_hash()


def test_content_hash_of_a_network_without_layout_is_unchanged() -> None:
    """Golden value computed with sdp/ir.py before ``input_layout`` was added (a31c287)."""
    conv = Conv2d(
        np.arange(54, dtype=float).reshape(2, 3, 3, 3) / 10 - 2,
        np.array([0.5, -0.25]),
        (3, 4, 4),
        padding=(1, 1, 1, 1),
    )
    dense = Dense(np.arange(96, dtype=float).reshape(3, 32) / 7 - 6, np.array([1.0, 0.0, -1.0]))
    net = Network((3, 4, 4), (conv, Activation("relu"), dense), name="golden")
    assert net.content_hash() == (
        "87bdfe940ce4efbf446d981dae8d7abaab7cab97f5e804ebff29dccc41d3abf4"
    )


def test_input_layout_is_checked_and_an_identity_one_dropped() -> None:
    dense = Dense(np.ones((2, 6)), np.zeros(2))
    with pytest.raises(ValueError, match="not a permutation"):
        InputLayout((2, 3), (0, 0))
    with pytest.raises(ValueError, match="does not give the input shape"):
        Network((2, 3), (dense,), input_layout=InputLayout((2, 3), (1, 0)))
    net = Network((2, 3), (dense,), input_layout=InputLayout((2, 3), (0, 1)))
    assert net.input_layout is None
    with pytest.raises(ValueError, match="5 features"):
        net.ir_inputs(np.zeros((1, 5)))
