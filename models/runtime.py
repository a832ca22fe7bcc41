"""Run an :class:`sdp.ir.Network` with PyTorch (CPU or CUDA): the inference side of one IR.

The logits a certificate talks about must come from the network that was bounded, so the
service never re-imports a model into torch by other means: :class:`TorchNetwork` is built
op by op from the same IR. Semantics match :meth:`sdp.ir.Network.forward` exactly:

    Dense       y = x W^T + b                                    (F.linear)
    Conv2d      y = conv2d(pad(x, (l, r, t, b)), W, stride, dilation, groups) + b
                (asymmetric padding via F.pad, then a conv with padding 0)
    Activation  relu, leaky_relu(a), tanh, sigmoid, elu(a), softplus = log(1 + e^x),
                identity, gelu (exact erf form), silu
    Residual    y = body(x) + shortcut(x)   (empty shortcut = identity)

Inputs and outputs are flat (batch, n) tensors in C order, like the IR. With
``file_layout=True`` the inputs are in the model file's layout instead (what onnxruntime
takes; differs only for a network with an :class:`sdp.ir.InputLayout`): the module gathers
them into the IR layout first, as :meth:`sdp.ir.Network.ir_inputs` does.

Warning: in float32 logits differ from the float64 IR by rounding (~1e-7 relative); a margin
computed from them carries that error, so radii must shrink it by a rigorous rounding bound
(:mod:`sdp.rounding`; the service does, and runs float64 on every device by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdp.ir import Activation, Conv2d, Dense, Network, Op, Residual


def resolve_device(name: str) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; also cpu, cuda and cuda:K.

    Raises:
        ValueError: any other name.
        RuntimeError: a CUDA device torch does not see.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    head, _, index = name.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"unknown device {name!r} (auto, cpu, cuda or cuda:K)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= (int(index) if index else 0):
        raise RuntimeError(f"device {name!r} requested but torch sees {count} CUDA device(s)")
    return name


def _param(a: np.ndarray, dtype: torch.dtype, device: Any) -> nn.Parameter:
    t = torch.tensor(np.array(a, copy=True), dtype=dtype, device=device)
    return nn.Parameter(t, requires_grad=False)


class TorchDense(nn.Module):
    """x -> x W^T + b."""

    def __init__(self, op: Dense, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.weight = _param(op.weight, dtype, device)
        self.bias = _param(op.bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TorchConv2d(nn.Module):
    """Flat (B, C*H*W) -> flat conv output; padding (top, left, bottom, right) via F.pad."""

    def __init__(self, op: Conv2d, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.weight = _param(op.weight, dtype, device)
        self.bias = _param(op.bias, dtype, device)
        self.in_shape = op.in_shape
        pt, pl, pb, pr = op.padding
        self.pad = (pl, pr, pt, pb)  # F.pad order: last dim first
        self.stride = op.stride
        self.dilation = op.dilation
        self.groups = op.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        if any(self.pad):
            x = F.pad(x, self.pad)
        y = F.conv2d(
            x,
            self.weight,
            self.bias,
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
        )
        return y.reshape(y.shape[0], -1)


class TorchActivation(nn.Module):
    """The IR's elementwise activations with the IR's parameters."""

    def __init__(self, op: Activation) -> None:
        super().__init__()
        self.name = op.name
        self.param = float(op.param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p = self.name, self.param
        if n == "relu":
            return F.relu(x)
        if n == "leaky_relu":
            return torch.where(x >= 0, x, p * x)
        if n == "tanh":
            return torch.tanh(x)
        if n == "sigmoid":
            return torch.sigmoid(x)
        if n == "elu":
            return torch.where(x > 0, x, p * torch.expm1(torch.clamp(x, max=0.0)))
        if n == "softplus":
            return torch.logaddexp(torch.zeros_like(x), x)
        if n == "identity":
            return x
        if n == "gelu":
            return F.gelu(x, approximate="none")
        if n == "silu":
            return F.silu(x)
        raise ValueError(f"unknown activation {n!r}")

    def extra_repr(self) -> str:
        return f"{self.name}, param={self.param}"


class TorchResidual(nn.Module):
    """x -> body(x) + shortcut(x)."""

    def __init__(self, op: Residual, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.body = _sequential(op.body, dtype, device)
        self.shortcut = _sequential(op.shortcut, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _module(op: Op, dtype: torch.dtype, device: Any) -> nn.Module:
    if isinstance(op, Dense):
        return TorchDense(op, dtype, device)
    if isinstance(op, Conv2d):
        return TorchConv2d(op, dtype, device)
    if isinstance(op, Activation):
        return TorchActivation(op)
    if isinstance(op, Residual):
        return TorchResidual(op, dtype, device)
    raise TypeError(f"unknown IR op {type(op).__name__}")


def _sequential(ops: tuple[Op, ...], dtype: torch.dtype, device: Any) -> nn.Sequential:
    return nn.Sequential(*(_module(op, dtype, device) for op in ops))


class TorchNetwork(nn.Module):
    """A torch module computing exactly :meth:`sdp.ir.Network.forward` (flat inputs).

    ``file_layout=True``: inputs are rows in the model file's layout, i.e. the module computes
    ``net.forward(net.ir_inputs(x))`` (the same as without it unless ``net.input_layout``).

    Example:
        >>> tnet = TorchNetwork.from_network(net, dtype=torch.float64)
        >>> logits = tnet(torch.as_tensor(x))          # x: (batch, n0)
    """

    input_index: torch.Tensor | None

    def __init__(
        self,
        net: Network,
        dtype: torch.dtype = torch.float32,
        device: Any = "cpu",
        *,
        file_layout: bool = False,
    ):
        super().__init__()
        self.input_shape = tuple(net.file_input_shape if file_layout else net.input_shape)
        self.input_size = net.input_size
        self.output_size = net.output_size
        self.dtype = dtype
        index = None
        if file_layout and net.input_layout is not None:
            index = torch.as_tensor(net.input_layout.index(), dtype=torch.long, device=device)
        self.register_buffer("input_index", index)
        self.layers = _sequential(net.ops, dtype, device)
        self.eval()

    @classmethod
    def from_network(
        cls,
        net: Network,
        dtype: torch.dtype = torch.float32,
        device: Any = "cpu",
        *,
        file_layout: bool = False,
    ) -> TorchNetwork:
        return cls(net, dtype=dtype, device=device, file_layout=file_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if self.input_index is not None:
            x = x[:, self.input_index]
        return self.layers(x)
