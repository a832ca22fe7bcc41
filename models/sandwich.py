"""Sandwich layers in PyTorch (Wang & Manchester, ICML 2023; design.md §3.4).

``SandwichLinear`` (hidden, 1-Lipschitz for any activation with slopes in [0, 1])::

    Z = X - X^T + Y^T Y,   A^T = (I + Z)^{-1}(I - Z),   B^T = -2 Y (I + Z)^{-1}
    h_out = sqrt(2) A^T Psi sigma( sqrt(2) Psi^{-1} B h_in + b ),   Psi = diag(exp(d))

``SandwichOutput`` is the linear output layer ``y = B h + b`` (||B||_2 <= 1).
``[X; Y]`` may be rescaled to Frobenius norm ``alpha`` (a learned scalar), as in
RobustNeuralNetworks.jl; that reparameterisation leaves the guarantee unchanged.

Weights are recomputed on every forward in training mode (gradients flow through the Cayley
transform; products are taken in the cheapest order for the batch size, see
:mod:`models.cayley_inverse`, so B^T is not formed when that is cheaper). In eval mode they are
computed once without gradients and cached; the cache is
keyed on the parameters' version counters, storage and dtype, so ``train()``, optimiser steps,
``load_state_dict`` and ``.to(...)`` all invalidate it (plus explicit hooks for the first two).
Warning: cached weights are detached, so in eval mode gradients reach the inputs but not the
parameters; train in training mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from models.cayley_inverse import CayleyOutFactor, InverseFactor, cayley_inverse
from models.cayley_inverse import cayley_matrix as _y_q_and_scale
from models.matrix_chain import chain_product
from sdp.ir import Activation

_SQRT2 = math.sqrt(2.0)


def activation_spec(module: nn.Module) -> Activation:
    """The sdp :class:`~sdp.ir.Activation` of a torch activation module (slopes must lie in [0,1]).

    Raises ValueError for activations the sandwich guarantee (or the IR) does not cover.
    """
    if isinstance(module, nn.ReLU):
        act = Activation("relu")
    elif isinstance(module, nn.Tanh):
        act = Activation("tanh")
    elif isinstance(module, nn.Sigmoid):
        act = Activation("sigmoid")
    elif isinstance(module, nn.Identity):
        act = Activation("identity")
    elif isinstance(module, nn.LeakyReLU):
        act = Activation("leaky_relu", float(module.negative_slope))
    elif isinstance(module, nn.ELU):
        act = Activation("elu", float(module.alpha))
    elif isinstance(module, nn.Softplus) and module.beta == 1 and module.threshold >= 20:
        act = Activation("softplus")
    else:
        raise ValueError(f"unsupported sandwich activation {module!r}")
    lo, hi = act.slope_bounds
    if lo < 0 or hi > 1:
        raise ValueError(f"{act.name} has slopes [{lo:g}, {hi:g}]; sandwich layers need [0, 1]")
    return act


def cayley_matrix(xy: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(Y (p, q), Q = I + Z (q, q), c) for [X; Y] rescaled by c = alpha / ||[X; Y]||_F (else 1).

    The rescaled Y is c Y; c is applied to q x q matrices only
    (Z = c (X - X^T) + c^2 Y^T Y), never to the (p + q) x q parameter. The symmetric part of
    Q is I + c^2 Y^T Y >= I, so Q is invertible with ||Q^{-1}||_2 <= 1. Built in one
    autograd node (:func:`models.cayley_inverse.cayley_matrix`).
    """
    return _y_q_and_scale(xy, alpha)


def cayley_factors(xy: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, M = (I + Z)^{-1}, c) (see :func:`cayley_matrix`; M by
    :func:`models.cayley_inverse.cayley_inverse`)."""
    y, q_mat, c = cayley_matrix(xy, alpha)
    return y, cayley_inverse(q_mat), c


def cayley(xy: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor]:
    """(A^T (q, q), B^T (p, q)): A^T = M (I - Z) = 2M - I and B^T = -2 c Y M."""
    y, m, c = cayley_factors(xy, alpha)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return 2.0 * m - eye, y @ (m * (-2.0 * c))


class _CachedWeights(nn.Module):
    """Eval-mode cache of derived weights (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[Any, tuple[Any, ...]] | None = None
        self.register_load_state_dict_pre_hook(self._drop_cache_hook)

    def _drop_cache_hook(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> _CachedWeights:
        if mode or mode != self.training:  # eval() on an eval-mode module keeps the cache
            self._cache = None
        return super().train(mode)

    def _cache_key(self) -> tuple[Any, ...]:
        return tuple(
            (p._version, p.data_ptr(), p.dtype, p.device) for p in self.parameters(recurse=False)
        )

    def _compute(self) -> Any:
        raise NotImplementedError

    def weights(self) -> Any:
        """Derived weights: recomputed with autograd in training mode, cached in eval mode."""
        if self.training:
            self._cache = None
            return self._compute()
        key = self._cache_key()
        if self._cache is None or self._cache[1] != key:
            with torch.no_grad():
                self._cache = (self._compute(), key)
        return self._cache[0]

    @property
    def cache_valid(self) -> bool:
        return self._cache is not None and self._cache[1] == self._cache_key()


class _SandwichParameters(_CachedWeights):
    """Raw parameters of a sandwich layer p -> q: ``XY`` ((q+p), q), ``d`` (q) for hidden
    layers, ``bias`` (q) when ``bias``, ``alpha`` (1) when ``normalize``; in that order."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        normalize: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        *,
        hidden: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.XY = nn.Parameter(torch.empty(out_features + in_features, out_features, **kw))
        if hidden:
            self.d = nn.Parameter(torch.zeros(out_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.alpha = nn.Parameter(torch.empty(1, **kw)) if normalize else None

    def reset_parameters(self) -> None:
        """XY Xavier-normal, bias uniform in +-1/sqrt(p), alpha = ||XY||_F."""
        nn.init.xavier_normal_(self.XY)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.copy_(torch.linalg.matrix_norm(self.XY))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, normalize={self.alpha is not None}"
        )


class SandwichLinear(_SandwichParameters):
    """Hidden sandwich layer ``in_features -> out_features``, 1-Lipschitz (l2).

    Args:
        in_features, out_features: p and q.
        bias: learn b (else b = 0).
        activation: a module with slopes in [0, 1] (ReLU, Tanh, Sigmoid, LeakyReLU(a>=0), ...).
        normalize: rescale [X; Y] to a learned Frobenius norm ``alpha`` (RobustNeuralNetworks.jl).

    Parameters: ``XY`` ((q+p), q), ``d`` (q), ``bias`` (q), ``alpha`` (1) when ``normalize``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: nn.Module | None = None,
        *,
        normalize: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, normalize, dtype, device, hidden=True)
        self.activation = activation if activation is not None else nn.ReLU()
        self.act_spec = activation_spec(self.activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.d)

    def _compute(self) -> tuple[Tensor, Tensor]:
        """(W_in (p, q), W_out (q, q)): u = h W_in + b, h_out = sigma(u) W_out (row vectors)."""
        a_t, b_t = cayley(self.XY, self.alpha)
        psi = torch.exp(self.d)
        return _SQRT2 * b_t / psi, _SQRT2 * psi[:, None] * a_t.T

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # u = x (-2 sqrt2 c Y M Psi^{-1}) + b in the cheapest order
            y, q_mat, c = cayley_matrix(self.XY, self.alpha)
            psi = torch.exp(self.d)
            inv = InverseFactor(q_mat, (-2.0 * _SQRT2) * c / psi)
            u = chain_product([x, y, inv], self.bias)
            return CayleyOutFactor(inv, psi).right(self.activation(u))
        w_in, w_out = self.weights()
        u = x @ w_in if self.bias is None else torch.addmm(self.bias, x, w_in)
        return self.activation(u) @ w_out


class SandwichOutput(_SandwichParameters):
    """Linear output layer ``y = B h + b`` with B from the Cayley transform (||B||_2 <= 1).

    Parameters: ``XY`` ((q+p), q), ``bias`` (q), ``alpha`` (1) when ``normalize``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        normalize: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, normalize, dtype, device, hidden=False)
        self.reset_parameters()

    def _compute(self) -> Tensor:
        """B^T (p, q): y = h B^T + b (row vectors)."""
        return cayley(self.XY, self.alpha)[1]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights()
        return x @ w if self.bias is None else torch.addmm(self.bias, x, w)
