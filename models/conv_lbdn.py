"""Convolutional LBDN for small images (28 x 28, 32 x 32) with l2 Lipschitz bound gamma.

    h_0 = sqrt(gamma) x,  h_j = SandwichConv2d_j(h_{j-1}),  g_0 = flat(h),
    g_k = SandwichLinear_k(g_{k-1}) (optional dense layers),  y = SandwichOutput(sqrt(gamma) g)

Each conv and dense sandwich layer is 1-Lipschitz and ||B_L|| <= 1, so Lip(x -> y) <= gamma.
Export: :meth:`ConvLBDN.sandwich_params` (float64 raw parameters), :meth:`ConvLBDN.to_network`
(the plain IR: exact Conv2d ops for the circular convolutions, see :mod:`sdp.sandwich.conv`),
:func:`conv_lbdn_to_bytes` (safetensors with the lipcert/1 "sandwich" config whose hidden
layers have type "sandwich_conv").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from models.conv import SandwichConv2d
from models.io import (
    _TORCH_ACTIVATIONS,
    hidden_layer_spec,
    layer_tensor_names,
    module_to_safetensors,
    read_safetensors,
    sandwich_file_config,
    state_from_layer_specs,
)
from models.sandwich import SandwichLinear, SandwichOutput
from sdp.errors import ModelRejected
from sdp.ir import Network
from sdp.sandwich.config import conv_params_from_safetensors
from sdp.sandwich.conv import ConvSandwichLayer, ConvSandwichParams, plain_network
from sdp.sandwich.dense import SandwichLayer


class ConvLBDN(nn.Module):
    """Conv sandwich layers, optional dense sandwich layers, a sandwich output; bound ``gamma``.

    Args:
        input_shape: (channels, n, n); flat inputs are reshaped to it.
        channels: output channels of each conv layer.
        strides: 1 or 2 per conv layer (default all 1).
        out_dim: number of logits.
        activation: factory of the hidden activation (slopes in [0, 1]).
        dense_widths: widths of dense sandwich layers between the flatten and the output.
    """

    log_gamma: Tensor

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int],
        out_dim: int,
        gamma: float = 1.0,
        *,
        strides: Sequence[int] | None = None,
        kernel_size: int = 3,
        activation: Callable[[], nn.Module] = nn.ReLU,
        normalize: bool = True,
        dense_widths: Sequence[int] = (),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError("gamma must be > 0")
        if any(w <= 0 for w in dense_widths):
            raise ValueError("dense widths must be positive")
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ValueError("input_shape must be (channels, n, n)")
        strides = list(strides) if strides is not None else [1] * len(channels)
        if len(strides) != len(channels):
            raise ValueError("one stride per conv layer")
        self.input_shape = tuple(int(v) for v in input_shape)
        layers = []
        c, n, _ = self.input_shape
        for q, s in zip(channels, strides, strict=True):
            layers.append(
                SandwichConv2d(
                    c, q, n, kernel_size, s, activation(), normalize=normalize, dtype=dtype
                )
            )
            c, n = q, n // s
        self.convs = nn.ModuleList(layers)
        sizes = [c * n * n, *dense_widths]
        self.dense = nn.ModuleList(
            SandwichLinear(p, q, activation=activation(), normalize=normalize, dtype=dtype)
            for p, q in itertools.pairwise(sizes)
        )
        self.output = SandwichOutput(sizes[-1], out_dim, normalize=normalize, dtype=dtype)
        dt = dtype or torch.get_default_dtype()
        self.register_buffer("log_gamma", torch.tensor([math.log(gamma)], dtype=dt))

    @property
    def gamma(self) -> float:
        return float(torch.exp(self.log_gamma.detach()).item())

    def forward(self, x: Tensor) -> Tensor:
        s = torch.exp(0.5 * self.log_gamma)
        h = s * x.reshape(x.shape[0], *self.input_shape)
        for layer in self.convs:
            h = layer(h)
        g = h.reshape(h.shape[0], -1)
        for dense in self.dense:
            g = dense(g)
        return self.output(s * g)

    @property
    def dense_widths(self) -> list[int]:
        return [cast(SandwichLinear, la).out_features for la in self.dense]

    # ----------------------------------------------------------------------------- export

    def sandwich_params(self, claimed_gamma: float | None = None) -> ConvSandwichParams:
        """Raw parameters as float64 numpy."""

        def np64(t: Tensor) -> np.ndarray:
            return t.detach().cpu().to(torch.float64).numpy().copy()

        def alpha_of(t: Tensor | None) -> float | None:
            return None if t is None else float(np64(t)[0])

        convs = []
        for layer in self.convs:
            assert isinstance(layer, SandwichConv2d)
            b = np.zeros(layer.out_channels) if layer.bias is None else np64(layer.bias)
            convs.append(
                ConvSandwichLayer(
                    np64(layer.XY),
                    b,
                    np64(layer.d),
                    layer.in_shape,
                    layer.stride,
                    alpha_of(layer.alpha),
                    layer.act_spec,
                )
            )

        def bias_of(t: Tensor | None, q: int) -> np.ndarray:
            return np.zeros(q) if t is None else np64(t)

        dense = []
        for la in self.dense:
            assert isinstance(la, SandwichLinear)
            b = bias_of(la.bias, la.out_features)
            dense.append(
                SandwichLayer(
                    "sandwich", np64(la.XY), b, np64(la.d), alpha_of(la.alpha), la.act_spec
                )
            )
        o = self.output
        bo = bias_of(o.bias, o.out_features)
        head = SandwichLayer("sandwich_output", np64(o.XY), bo, None, alpha_of(o.alpha), None)
        gamma = math.exp(float(self.log_gamma.detach().double().item()))
        claim = gamma if claimed_gamma is None else claimed_gamma
        shape = cast(tuple[int, int, int], self.input_shape)
        return ConvSandwichParams(gamma, tuple(convs), head, shape, claim, dense=tuple(dense))

    def to_network(self, name: str = "") -> Network:
        """The equivalent plain network in the sdp IR (float64), ``Network.sandwich`` set."""
        net = plain_network(self.sandwich_params())
        return Network(net.input_shape, net.ops, sandwich=net.sandwich, name=name)


def conv_lbdn_config(model: ConvLBDN, claimed_gamma: float | None = None) -> dict[str, Any]:
    """The lipcert/1 "sandwich" config of ``model``; tensor names are its state_dict keys."""
    specs: list[dict[str, Any]] = []
    for i, layer in enumerate(model.convs):
        assert isinstance(layer, SandwichConv2d)
        specs.append(
            {
                "type": "sandwich_conv",
                "in_shape": list(layer.in_shape),
                "out_channels": layer.out_channels,
                "kernel_size": layer.kernel_size,
                "stride": layer.stride,
                "activation": layer.act_spec.name,
                "activation_param": layer.act_spec.param,
                "tensors": layer_tensor_names(f"convs.{i}.", layer, hidden=True),
            }
        )
    specs.extend(hidden_layer_spec(f"dense.{i}.", d) for i, d in enumerate(model.dense))
    return sandwich_file_config(model, specs, claimed_gamma)


def conv_lbdn_to_bytes(model: ConvLBDN, claimed_gamma: float | None = None) -> bytes:
    """Serialise ``model`` (raw parameters as stored) to safetensors bytes."""
    return module_to_safetensors(model, conv_lbdn_config(model, claimed_gamma))


def save_conv_lbdn(model: ConvLBDN, path: str | Path, claimed_gamma: float | None = None) -> None:
    Path(path).write_bytes(conv_lbdn_to_bytes(model, claimed_gamma))


def conv_lbdn_from_tensors(
    tensors: dict[str, np.ndarray], config: dict[str, Any], dtype: torch.dtype | None = None
) -> ConvLBDN:
    """Build a :class:`ConvLBDN` from a conv "sandwich" config (validated first) and its tensors."""
    params = conv_params_from_safetensors(tensors, config)
    acts = {(la.activation.name, la.activation.param) for la in params.convs}
    acts |= {(la.activation.name, la.activation.param) for la in params.dense if la.activation}
    ks = {la.xy.shape[-1] for la in params.convs}
    specs = config["layers"]
    normalize = {"alpha" in s["tensors"] for s in specs}
    if len(acts) > 1 or len(ks) > 1 or len(normalize) > 1 or not params.convs:
        raise ModelRejected(
            "ConvLBDN modules need >= 1 conv layer, one activation, one kernel size and alpha "
            "on every layer or none",
            code="unsupported-kind",
        )
    name, param = acts.pop()
    model = ConvLBDN(
        params.input_shape,
        [la.out_channels for la in params.convs],
        params.output.out_features,
        params.gamma,
        strides=[la.stride for la in params.convs],
        kernel_size=ks.pop(),
        activation=lambda: _TORCH_ACTIVATIONS[name](param),
        normalize=normalize.pop(),
        dense_widths=[la.out_features for la in params.dense],
        dtype=dtype,
    )
    state = model.state_dict()
    targets = [f"convs.{i}." for i in range(len(params.convs))]
    targets += [f"dense.{i}." for i in range(len(params.dense))] + ["output."]
    new: dict[str, Tensor] = {"log_gamma": torch.tensor([math.log(params.gamma)])}
    top = config.get("tensors") or {}
    if "log_gamma" in top:  # bit-exact copy of the stored scale
        new["log_gamma"] = torch.as_tensor(np.asarray(tensors[top["log_gamma"]]).reshape(1))
    new.update(state_from_layer_specs(tensors, specs, targets))
    for k in set(state) - set(new):  # layers stored without a bias: zero bias
        new[k] = torch.zeros_like(state[k])
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in new.items()})
    return model


def load_conv_lbdn(path: str | Path, dtype: torch.dtype | None = None) -> ConvLBDN:
    """Load a :class:`ConvLBDN` from a lipcert safetensors file (no code is executed)."""
    tensors, config = read_safetensors(path)
    return conv_lbdn_from_tensors(tensors, config, dtype=dtype)
