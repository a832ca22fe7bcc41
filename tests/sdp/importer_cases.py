"""Builders shared by the importer tests: ONNX graphs, .mat and safetensors bytes, and
onnxruntime as the oracle."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import scipy.io as sio
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save as st_save

from sdp.ir import Network

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


def input_shape(path: Path) -> list[int]:
    dims = ort.InferenceSession(str(path)).get_inputs()[0].shape
    return [d if isinstance(d, int) else 1 for d in dims]


def mat_bytes(compress: bool = False, **variables: object) -> bytes:
    buf = io.BytesIO()
    sio.savemat(buf, variables, do_compression=compress)
    return buf.getvalue()


def cell(*arrays: np.ndarray) -> np.ndarray:
    c = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        c[0, i] = a
    return c


# ---------------------------------------------------------------- hand-built ONNX models
def init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def make_model(
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


def rng_w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def st_bytes(tensors: dict, config: object | None, raw_meta: str | None = None) -> bytes:
    meta = (
        None
        if config is None and raw_meta is None
        else {"lipcert": raw_meta if raw_meta is not None else json.dumps(config)}
    )
    return st_save(tensors, metadata=meta)
