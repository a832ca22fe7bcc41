"""Models exported by torch.onnx (the legacy TorchScript exporter; the dynamo exporter needs
onnxscript) and dynamo-style graphs built by hand: the IR equals the torch module."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from sdp.errors import ModelRejected, UnsupportedOp
from sdp.importers import load_model
from sdp.ir import Activation, Residual
from tests.sdp.importer_cases import init, make_model, rng_w


class _Normalise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.c2(torch.relu(self.bn(self.c1(x)))))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.ELU(0.7),
        nn.Linear(8, 8),
        nn.Softplus(beta=2.0),
        nn.Linear(8, 8),
        nn.SiLU(),
        nn.Linear(8, 8),
        nn.GELU(),
        nn.Linear(8, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        _Normalise(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        _Block(4),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _export(net: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_torch_export_equals_module(kind: str) -> None:
    torch.manual_seed(0)
    net = (_mlp() if kind == "mlp" else _cnn()).eval()
    for m in net.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1, 1)
    x = torch.rand(4, 3, 2, 2) if kind == "mlp" else torch.rand(4, 3, 8, 8)
    data = _export(net, x[:1])
    ir = load_model(data)
    with torch.no_grad():
        want = net.double()(x.double()).numpy()
    got = ir.forward(x.double().numpy().reshape(4, -1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))
    if kind == "cnn":
        assert sum(isinstance(op, Residual) for op in ir.ops) == 1
    else:
        names = [op.name for op in ir.ops if isinstance(op, Activation)]
        assert names == ["leaky_relu", "tanh", "elu", "softplus", "silu", "gelu", "sigmoid"]


def _dynamo_softplus(beta: float, threshold: float) -> bytes:
    """The graph torch's dynamo exporter writes for nn.Softplus(beta, threshold)."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1)]
    if beta != 1.0:
        nodes += [
            helper.make_node("Mul", ["h", "beta"], ["hb"]),
            helper.make_node("Softplus", ["hb"], ["sp0"]),
            helper.make_node("Div", ["sp0", "beta"], ["sp"]),
        ]
    else:
        nodes += [
            helper.make_node("Identity", ["h"], ["hb"]),
            helper.make_node("Softplus", ["h"], ["sp"]),
        ]
    nodes += [
        helper.make_node("Greater", ["hb", "thr"], ["big"]),
        helper.make_node("Where", ["big", "h", "sp"], ["a"], name="where"),
        helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1),
    ]
    inits = [
        init("w", 8 * rng_w(4, 3)),
        init("b", rng_w(4)),
        init("beta", np.float32(beta)),
        init("thr", np.float32(threshold)),
        init("w2", rng_w(2, 4)),
    ]
    return make_model(nodes, inits, [1, 3], [1, 2], opset=20)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_dynamo_softplus_pattern(beta: float) -> None:
    data = _dynamo_softplus(beta, 20.0)
    net = load_model(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-3, 3, (20, 1, 3)).astype(np.float32)
    h = x.reshape(20, 3) @ (8 * rng_w(4, 3)).T.astype(np.float64) + rng_w(4)
    assert (beta * h > 20).any() and (beta * h < 20).any()  # both branches of Where are used
    for xi in x:  # large weights: some units sit above the threshold
        want = sess.run(None, {"x": xi})[0].ravel()
        np.testing.assert_allclose(
            net.forward(xi.ravel()), want, atol=1e-5 * max(1, abs(want).max())
        )
    assert [op.name for op in net.ops if isinstance(op, Activation)] == ["softplus"]
    with pytest.raises(UnsupportedOp) as exc:  # a low threshold is a different function
        load_model(_dynamo_softplus(beta, 2.0))
    assert exc.value.node == "where"


def test_dynamo_silu_and_gelu() -> None:
    silu = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["h"]),
            helper.make_node("Sigmoid", ["h"], ["s"]),
            helper.make_node("Mul", ["h", "s"], ["a"]),
            helper.make_node("Gelu", ["a"], ["g"]),
            helper.make_node("MatMul", ["g", "w2"], ["y"]),
        ],
        [init("w", rng_w(3, 4)), init("b", rng_w(4)), init("w2", rng_w(4, 2))],
        [1, 3],
        [1, 2],
        opset=20,
    )
    net = load_model(silu)
    assert [op.name for op in net.ops if isinstance(op, Activation)] == ["silu", "gelu"]
    sess = ort.InferenceSession(silu, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 3)).astype(np.float32)
    np.testing.assert_allclose(
        net.forward(x.ravel()), sess.run(None, {"x": x})[0].ravel(), atol=1e-5
    )
    tanh_gelu = make_model(
        [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], [], [1, 3], [1, 3], opset=20
    )
    with pytest.raises(ModelRejected) as exc:
        load_model(tanh_gelu)
    assert exc.value.code == "unsupported-attribute"
    # x * sigmoid(y) with y != x is not SiLU
    not_silu = make_model(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Sigmoid", ["x2"], ["s"]),
            helper.make_node("Mul", ["x", "s"], ["y"]),
        ],
        [init("two", np.float32(2.0))],
        [1, 3],
        [1, 3],
    )
    with pytest.raises(ModelRejected) as exc:
        load_model(not_silu)
    assert exc.value.code == "unsupported-graph"
