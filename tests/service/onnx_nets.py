"""Helpers for service tests: real ONNX nets built with onnx.helper, problem+json checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import scipy.io
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(
    weights: list[np.ndarray],
    biases: list[np.ndarray] | None = None,
    *,
    activation: str = "Relu",
    opset: int = 13,
) -> bytes:
    """Gemm(transB=1) + activation chain; ``weights`` in (out, in) layout like LipSDP's."""
    nodes, inits = [], []
    x = "input"
    for k, w in enumerate(weights):
        w = np.asarray(w, dtype=np.float32)
        inits.append(numpy_helper.from_array(w, f"W{k}"))
        ins = [x, f"W{k}"]
        if biases is not None:
            inits.append(numpy_helper.from_array(np.asarray(biases[k], np.float32), f"b{k}"))
            ins.append(f"b{k}")
        y = f"z{k}" if k < len(weights) - 1 else "logits"
        nodes.append(helper.make_node("Gemm", ins, [y], transB=1, name=f"gemm{k}"))
        if k < len(weights) - 1:
            nodes.append(helper.make_node(activation, [y], [f"a{k}"], name=f"act{k}"))
            x = f"a{k}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, weights[0].shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, weights[-1].shape[0]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def lipsdp_weights(fixtures_dir: Path, name: str = "random_weights.mat") -> list[np.ndarray]:
    mat = scipy.io.loadmat(fixtures_dir / "lipsdp" / name)
    return [np.asarray(w, dtype=np.float64) for w in mat["weights"].ravel()]


def norm_product(weights: list[np.ndarray]) -> float:
    """Product of spectral norms: a valid Lipschitz upper bound of a ReLU chain."""
    return float(np.prod([np.linalg.norm(np.asarray(w, np.float64), 2) for w in weights]))


def assert_problem(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and code)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status
    assert body["type"].startswith("https://lipcert.dev/problems/")
    assert body["type"].endswith("/" + body["code"])
    assert body["title"] and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_oip_error(resp: Any, status: int, words: str | None = None) -> str:
    """The response is an Open Inference Protocol error (``{"error": message}``, JSON, with
    the error's extensions beside it when it has some) with this status (and these words in
    its message); the message."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert not {"type", "title", "status", "detail", "code"} & set(body), body  # no problem
    if words is not None:
        assert words in body["error"], body
    return str(body["error"])
