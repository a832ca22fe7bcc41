"""LBDN: a Lipschitz-bounded deep network built from sandwich layers (design.md §3.4).

    h_0 = sqrt(gamma) x,   h_k = SandwichLinear_k(h_{k-1}),   y = SandwichOutput(sqrt(gamma) h_L)

so Lip(x -> y) <= gamma for every parameter value. In eval mode the network runs as its
equivalent plain MLP (one matmul per layer, weights
``W_k = 2 Psi_k^{-1} B_k A_{k-1}^T Psi_{k-1}``) cached like the layers' own weights.
Export: :meth:`LBDN.sandwich_params` (float64 raw parameters) and :meth:`LBDN.to_network`
(the plain sdp IR network carrying those parameters for the closed-form check).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from models.cayley_inverse import CayleyOutFactor, InverseFactor
from models.matrix_chain import chain_product
from models.sandwich import SandwichLinear, SandwichOutput, _CachedWeights, cayley_matrix
from sdp.ir import Network
from sdp.sandwich.dense import SandwichLayer, SandwichParams, plain_network

_SQRT2 = math.sqrt(2.0)


class LBDN(_CachedWeights):
    """Dense LBDN ``in_dim -> widths... -> out_dim`` with l2 Lipschitz bound ``gamma``.

    Args:
        in_dim: flat input size (inputs of any shape are flattened).
        widths: hidden sizes.
        out_dim: number of outputs (logits).
        gamma: the Lipschitz bound (stored as the buffer ``log_gamma``; ``learn_gamma`` makes it
            a parameter, the bound then being whatever it has become).
        activation: the hidden activation: a module class/factory (default ``nn.ReLU``) or a
            module instance (copied per layer); slopes must lie in [0, 1].
        input_shape: recorded for export (default ``(in_dim,)``).

    Example:
        >>> net = LBDN(784, [64, 64], 10, gamma=2.0)
        >>> net.to_network().sandwich.gamma   # doctest: +SKIP
        2.0
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        out_dim: int,
        gamma: float = 1.0,
        *,
        activation: type[nn.Module] | Any = nn.ReLU,
        normalize: bool = True,
        learn_gamma: bool = False,
        input_shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError("gamma must be > 0")
        self.in_dim, self.out_dim, self.widths = in_dim, out_dim, list(widths)
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_dim,)
        if math.prod(self.input_shape) != in_dim:
            raise ValueError(f"input_shape {self.input_shape} does not have {in_dim} entries")
        sizes = [in_dim, *self.widths]
        if isinstance(activation, nn.Module):  # an instance: one copy per layer
            template = activation
            activation = lambda: copy.deepcopy(template)  # noqa: E731
        self.hidden = nn.ModuleList(
            SandwichLinear(p, q, activation=activation(), normalize=normalize, dtype=dtype)
            for p, q in itertools.pairwise(sizes)
        )
        self.output = SandwichOutput(sizes[-1], out_dim, normalize=normalize, dtype=dtype)
        log_gamma = torch.tensor([math.log(gamma)], dtype=dtype or torch.get_default_dtype())
        if learn_gamma:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)

    @property
    def hidden_layers(self) -> list[SandwichLinear]:
        """The hidden sandwich layers (``self.hidden``, typed)."""
        return [cast(SandwichLinear, layer) for layer in self.hidden]

    @property
    def gamma(self) -> float:
        return float(torch.exp(self.log_gamma.detach()).item())

    def _cache_key(self) -> tuple[Any, ...]:
        return tuple(
            (p._version, p.data_ptr(), p.dtype, p.device)
            for p in [*self.parameters(), self.log_gamma]
        )

    def _compute(self) -> list[tuple[Tensor, Tensor | None]]:
        """Plain weights (W_k^T, b_k), row-vector form: z_{k+1} = sigma(z_k W_k^T + b_k)."""
        s = torch.exp(0.5 * self.log_gamma)
        out: list[tuple[Tensor, Tensor | None]] = []
        carry: Tensor | None = None  # sqrt(2) Psi_{k-1} A_{k-1} (q_prev, q_prev), row form
        for layer in self.hidden:
            assert isinstance(layer, SandwichLinear)
            w_in, w_out = layer._compute()
            out.append((s * w_in if carry is None else carry @ w_in, layer.bias))
            carry = w_out
        b_t = self.output._compute()
        out.append((s * s * b_t if carry is None else s * (carry @ b_t), self.output.bias))
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if not self.training:
            plain = self.weights()
            for (w, b), layer in zip(plain[:-1], self.hidden_layers, strict=True):
                x = layer.activation(x @ w if b is None else torch.addmm(b, x, w))
            w, b = plain[-1]
            return x @ w if b is None else torch.addmm(b, x, w)
        return self._train_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        """Training forward with the Cayley transforms recomputed (autograd through them).

        Between two activations the map is one matrix chain, e.g. for hidden layers k, k+1
        (row vectors, M = (I + Z)^{-1}, c the Frobenius rescaling of layer k+1)::

            u_{k+1} = z_k [sqrt2 Psi_k (2 M_k^T - I)] Y_{k+1} [-2 sqrt2 c M_{k+1} Psi_{k+1}^-1] + b

        (the input's sqrt(gamma) goes into the first chain, the output's into the last); each
        chain is multiplied in its cheapest order for this batch size
        (:func:`models.cayley_inverse.chain_product`): small batches never form B^T, large
        ones fold A_k into the next layer's weights, the output layer is always folded.
        """
        s = torch.exp(0.5 * self.log_gamma)
        z: Tensor = x
        carry: CayleyOutFactor | None = None  # the previous hidden layer's W_out
        for layer in self.hidden_layers:
            y, q_mat, c = cayley_matrix(layer.XY, layer.alpha)
            psi = torch.exp(layer.d)
            scale = (-2.0 * _SQRT2) * c / psi
            if carry is None:
                inv = InverseFactor(q_mat, s * scale)
                u = chain_product([z, y, inv], layer.bias)
            else:
                inv = InverseFactor(q_mat, scale)
                u = chain_product([z, carry, y, inv], layer.bias)
            z = layer.activation(u)
            carry = CayleyOutFactor(inv, psi)  # the same M = Q^{-1}
        o = self.output
        y, q_mat, c = cayley_matrix(o.XY, o.alpha)
        if carry is None:  # y = sqrt(gamma) B_L sqrt(gamma) x + b
            return chain_product([z, y, InverseFactor(q_mat, -2.0 * c * s * s)], o.bias)
        return chain_product([z, carry, y, InverseFactor(q_mat, -2.0 * c * s)], o.bias)

    # ----------------------------------------------------------------------------- export

    def sandwich_params(self, claimed_gamma: float | None = None) -> SandwichParams:
        """Raw parameters as float64 numpy (the exact values; maths is redone in float64)."""

        def np64(t: Tensor) -> np.ndarray:
            return t.detach().cpu().to(torch.float64).numpy().copy()

        def b_or_zero(t: Tensor | None, q: int) -> np.ndarray:
            return np.zeros(q) if t is None else np64(t)

        def alpha_of(t: Tensor | None) -> float | None:
            return None if t is None else float(np64(t)[0])

        layers: list[SandwichLayer] = [
            SandwichLayer(
                "sandwich",
                np64(layer.XY),
                b_or_zero(layer.bias, layer.out_features),
                np64(layer.d),
                alpha_of(layer.alpha),
                layer.act_spec,
            )
            for layer in self.hidden_layers
        ]
        o = self.output
        layers.append(
            SandwichLayer(
                "sandwich_output",
                np64(o.XY),
                b_or_zero(o.bias, o.out_features),
                None,
                alpha_of(o.alpha),
                None,
            )
        )
        gamma = math.exp(float(self.log_gamma.detach().double().item()))
        return SandwichParams(
            gamma,
            tuple(layers),
            self.input_shape,
            gamma if claimed_gamma is None else claimed_gamma,
        )

    def to_network(self, name: str = "") -> Network:
        """The equivalent plain network in the sdp IR (float64), ``Network.sandwich`` set."""
        net = plain_network(self.sandwich_params())
        return Network(net.input_shape, net.ops, sandwich=net.sandwich, name=name)
