"""Baselines for the benchmarks: plain MLP, spectral-normalised MLP, orthogonal (Cayley) MLP.

- ``plain_mlp``: ``nn.Linear`` + ReLU, no Lipschitz control.
- ``spectral_mlp``: each ``nn.Linear`` wrapped in torch's spectral-norm parametrisation
  (W / sigma_max(W) by power iteration: an estimate, not a certificate; Miyato et al. 2018).
- ``OrthogonalLinear``: W = the leading (out x in) block of the Cayley transform
  Q = (I + S)^{-1}(I - S) of a skew-symmetric S (n = max(in, out)), so ||W||_2 <= 1
  (Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", 2021).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from models.sandwich import _CachedWeights


def plain_mlp(in_dim: int, widths: Sequence[int], out_dim: int) -> nn.Sequential:
    """Flatten, then Linear+ReLU per hidden width, then Linear."""
    sizes = [in_dim, *widths]
    layers: list[nn.Module] = [nn.Flatten()]
    for p, q in itertools.pairwise(sizes):
        layers += [nn.Linear(p, q), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out_dim))
    return nn.Sequential(*layers)


def spectral_mlp(in_dim: int, widths: Sequence[int], out_dim: int) -> nn.Sequential:
    """``plain_mlp`` with every Linear spectrally normalised (power iteration, 1 step/forward)."""
    net = plain_mlp(in_dim, widths, out_dim)
    for i, m in enumerate(net):
        if isinstance(m, nn.Linear):
            net[i] = spectral_norm(m)
    return net


class OrthogonalLinear(_CachedWeights):
    """Linear layer with W = leading block of a Cayley-orthogonal matrix (||W||_2 <= 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n = max(in_features, out_features)
        self.skew = nn.Parameter(torch.randn(n, n) / math.sqrt(n))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _compute(self) -> Tensor:
        """W^T (in, out): Q = (I + S)^{-1}(I - S), S = A - A^T."""
        s = self.skew - self.skew.T
        eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        q = 2.0 * torch.linalg.inv(eye + s) - eye  # (I+S)^{-1}(I-S) = 2(I+S)^{-1} - I
        return q[: self.out_features, : self.in_features].T

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights()
        return x @ w if self.bias is None else torch.addmm(self.bias, x, w)


def orthogonal_mlp(in_dim: int, widths: Sequence[int], out_dim: int) -> nn.Sequential:
    """Flatten, OrthogonalLinear+ReLU per hidden width, then OrthogonalLinear (1-Lipschitz)."""
    sizes = [in_dim, *widths]
    layers: list[nn.Module] = [nn.Flatten()]
    for p, q in itertools.pairwise(sizes):
        layers += [OrthogonalLinear(p, q), nn.ReLU()]
    layers.append(OrthogonalLinear(sizes[-1], out_dim))
    return nn.Sequential(*layers)
