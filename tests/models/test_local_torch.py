"""The torch alpha-CROWN slope optimiser (models.local) against sdp's numpy propagation.

For the SlopeProblem sdp hands out, the torch bound at given slopes equals sdp's rigorous
float64 bound within its rounding margin (and is never below it by more than that), for dense,
convolutional (stride 2, asymmetric padding) and residual networks with ReLU / leaky ReLU; the
torch-optimised slopes, re-verified by sdp, never certify less than sdp alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models.local import TorchSlopeOptimizer, _Problem
from sdp.importers import load_model
from sdp.local import SlopeProblem, certify_local
from sdp.local.alpha import IntermediateAlpha
from sdp.local.graph import build_graph
from sdp.local.margins import INTER_ITERATIONS
from sdp.local.propagate import backward, compute_bounds
from tests.service.jobs_support import tiny_residual_onnx


def _model(nodes: list[Any], inits: list[Any], shape: list[int], k: int) -> bytes:
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float) -> Any:
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def dense_net(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2", "b2"], ["h2"], transB=1),
        helper.make_node("LeakyRelu", ["h2"], ["a2"], alpha=0.1),
        helper.make_node("Gemm", ["a2", "W3", "b3"], ["y"], transB=1),
    ]
    inits = [
        _init(rng, "W1", (24, 6), 0.5), _init(rng, "b1", (24,), 0.1),
        _init(rng, "W2", (24, 24), 0.25), _init(rng, "b2", (24,), 0.1),
        _init(rng, "W3", (4, 24), 0.25), _init(rng, "b3", (4,), 0.1),
    ]  # fmt: skip
    return _model(nodes, inits, [6], 4)


def conv_net(seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "K", "kb"], ["c"], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
    ]
    inits = [
        _init(rng, "K", (3, 2, 3, 3), 0.4), _init(rng, "kb", (3,), 0.1),
        _init(rng, "W", (5, 27), 0.3), _init(rng, "b", (5,), 0.1),
    ]  # fmt: skip
    return _model(nodes, inits, [2, 6, 6], 5)


class Recording:
    """Wraps the torch optimiser and keeps what sdp asked and what came back."""

    def __init__(self) -> None:
        self.inner = TorchSlopeOptimizer("cpu", iterations=10)
        self.calls: list[tuple[SlopeProblem, list[np.ndarray]]] = []

    def __call__(self, problem: SlopeProblem) -> list[np.ndarray]:
        out = list(self.inner(problem))
        self.calls.append((problem, out))
        return out


def _rigorous(problem: SlopeProblem, alphas: list[np.ndarray]) -> np.ndarray:
    graph = build_graph(problem.net)
    hook = IntermediateAlpha(iterations=INTER_ITERATIONS)  # as sdp.local.margins.alpha_crown
    st = compute_bounds(graph, problem.x0, problem.eps, node_hook=hook)
    for k, lo, hi in zip(problem.act_nodes, problem.pre_lower, problem.pre_upper, strict=True):
        parent = graph.nodes[k].parents[0]  # the same pre-activation bounds as the problem's
        np.testing.assert_array_equal(st.lo[parent], lo)
        np.testing.assert_array_equal(st.hi[parent], hi)
    init = {graph.output: problem.objective}
    c0 = np.zeros(problem.objective.shape[:2])
    return backward(st, init, c0, alphas=dict(zip(problem.act_nodes, alphas, strict=True))).lower


def _torch_bound(problem: SlopeProblem, alphas: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        run = _Problem(build_graph(problem.net), problem, torch.device("cpu"))
        value = run.bound(
            {k: torch.as_tensor(a) for k, a in zip(problem.act_nodes, alphas, strict=True)}
        )
    return value.numpy()


@pytest.mark.parametrize(
    ("make", "n0", "eps"),
    [(dense_net, 6, 0.15), (conv_net, 72, 0.1), (tiny_residual_onnx, 4, 0.1)],
)
def test_torch_bound_equals_sdp_within_rounding(make: Any, n0: int, eps: float) -> None:
    net = load_model(make())
    x = np.random.default_rng(7).normal(size=(5, n0))
    rec = Recording()
    with_torch = certify_local(net, x, epsilon=eps, method="alpha-crown", optimizer=rec)
    assert rec.calls, "sdp never asked the optimiser (no unstable neuron?)"
    for problem, theirs in rec.calls:
        for alphas in (list(problem.alpha_init), theirs):
            rig = _rigorous(problem, alphas)
            tb = _torch_bound(problem, alphas)
            margin = 1e-9 * (1.0 + np.abs(tb))
            assert np.all(rig <= tb + margin)  # rigorous is never above the float value ...
            assert np.all(tb - rig <= margin)  # ... and only rounding below it
        # the torch slopes, re-verified, are at least as good as where they started
        assert np.all(
            _rigorous(problem, theirs)
            >= _rigorous(problem, list(problem.alpha_init))
            - 1e-9 * (1 + np.abs(_torch_bound(problem, theirs)))
        )
    alone = certify_local(net, x, epsilon=eps, method="alpha-crown")
    assert np.all(np.asarray(with_torch.certified) >= np.asarray(alone.certified))


def test_other_activations_get_their_slopes_back() -> None:
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "W2", "b2"], ["h2"], transB=1),
        helper.make_node("Sigmoid", ["h2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W3", "b3"], ["y"], transB=1),
    ]
    inits = [
        _init(rng, "W1", (16, 4), 0.6), _init(rng, "b1", (16,), 0.1),
        _init(rng, "W2", (8, 16), 0.4), _init(rng, "b2", (8,), 0.1),
        _init(rng, "W3", (3, 8), 0.4), _init(rng, "b3", (3,), 0.1),
    ]  # fmt: skip
    net = load_model(_model(nodes, inits, [4], 3))
    rec = Recording()
    certify_local(net, rng.normal(size=(3, 4)), epsilon=0.2, method="alpha-crown", optimizer=rec)
    assert rec.calls  # the ReLU layer has unstable neurons
    for problem, theirs in rec.calls:
        for a, b in zip(problem.alpha_init, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
