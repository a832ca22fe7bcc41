"""Convolutional sandwich layer in PyTorch (Wang & Manchester, ICML 2023; design.md §3.4).

Circular convolution on a fixed n x n input, computed per frequency of the unitary 2-D FFT.
The free kernel ``XY`` ((q + p) x q x k x k, p = in_channels * stride^2) has, per frequency f,
the DFT blocks X(f) (q x q) and Y(f) (p x q); with Z = X - X^H + Y^H Y::

    A^H = (I + Z)^{-1}(I - Z) = 2 (I + Z)^{-1} - I,   B^H = -2 Y (I + Z)^{-1},   A A^H + B B^H = I
    h_out = sqrt(2) A^H Psi sigma( sqrt(2) Psi^{-1} B S h + b ),    Psi = diag(exp(d)) per channel

S is space-to-depth (``pixel_unshuffle``) for stride 2, the identity for stride 1. The layer is
1-Lipschitz (l2) for activations with slopes in [0, 1]; see :mod:`sdp.sandwich.conv` for the
derivation, the numpy twin and the per-frequency certificate check.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.sandwich import _CachedWeights, activation_spec

_SQRT2 = math.sqrt(2.0)


def freq_apply(mats: Tensor, x: Tensor) -> Tensor:
    """Per-frequency ``mats[f] @ x(f)``: (F, a, b) x (B, b, m, m) -> (B, a, m, m), unitary rfft2."""
    bsz, _, m, _ = x.shape
    xf = torch.fft.rfft2(x, norm="ortho").reshape(bsz, x.shape[1], -1)
    yf = torch.einsum("fab,Bbf->Baf", mats, xf)
    return torch.fft.irfft2(yf.reshape(bsz, mats.shape[1], m, m // 2 + 1), s=(m, m), norm="ortho")


def frequency_cayley(xy: Tensor, alpha: Tensor | None, m: int) -> tuple[Tensor, Tensor]:
    """(A^H (F, q, q), B^H (F, p, q)) per rfft2 frequency of the kernel placed on an m x m grid."""
    if alpha is not None:
        xy = xy * (alpha[0] / torch.linalg.vector_norm(xy))
    k, q = xy.shape[-1], xy.shape[1]
    grid = F.pad(xy, (0, m - k, 0, m - k))
    grid = torch.roll(grid, (-(k // 2), -(k // 2)), dims=(2, 3))
    spec = torch.fft.rfft2(grid).reshape(xy.shape[0], q, -1).permute(2, 0, 1)
    x, y = spec[:, :q], spec[:, q:]
    z = x - x.mH + y.mH @ y
    eye = torch.eye(q, dtype=spec.dtype, device=spec.device)
    inv = torch.linalg.inv(eye + z)
    return 2.0 * inv - eye, -2.0 * (y @ inv)


class SandwichConv2d(_CachedWeights):
    """1-Lipschitz circular-convolution sandwich layer on (B, in_channels, n, n) inputs.

    Args:
        in_channels, out_channels: c_in and q.
        size: the fixed input grid n (the output grid is n / stride).
        kernel_size: taps k of the free kernel (the derived A, B have full support).
        stride: 1, or 2 via space-to-depth (n must be even).
        activation: slopes in [0, 1] (default ReLU).
        normalize: rescale XY to a learned Frobenius norm ``alpha``.

    Parameters: ``XY`` (q + p, q, k, k), ``d`` (q), ``bias`` (q), ``alpha`` (1) when normalize.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        kernel_size: int = 3,
        stride: int = 1,
        activation: nn.Module | None = None,
        *,
        bias: bool = True,
        normalize: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if stride not in (1, 2) or size % stride:
            raise ValueError("stride must be 1 or 2 and divide the input size")
        if kernel_size > size // stride:
            raise ValueError("kernel larger than the grid")
        self.in_channels, self.out_channels, self.size = in_channels, out_channels, size
        self.kernel_size, self.stride = kernel_size, stride
        self.activation = activation if activation is not None else nn.ReLU()
        self.act_spec = activation_spec(self.activation)
        p = in_channels * stride * stride
        kw: dict[str, Any] = {"dtype": dtype}
        self.XY = nn.Parameter(
            torch.empty(out_channels + p, out_channels, kernel_size, kernel_size, **kw)
        )
        self.d = nn.Parameter(torch.zeros(out_channels, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.alpha = nn.Parameter(torch.empty(1, **kw)) if normalize else None
        self.reset_parameters()

    @property
    def grid(self) -> int:
        return self.size // self.stride

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.size, self.size)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.out_channels, self.grid, self.grid)

    def reset_parameters(self) -> None:
        k = self.kernel_size
        nn.init.normal_(self.XY, std=1.0 / (k * math.sqrt(self.out_channels)))
        nn.init.zeros_(self.d)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -0.1, 0.1)
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.copy_(torch.linalg.vector_norm(self.XY))

    def _compute(self) -> tuple[Tensor, Tensor]:
        return frequency_cayley(self.XY, self.alpha, self.grid)

    def forward(self, h: Tensor) -> Tensor:
        astar, bstar = self.weights()
        psi = torch.exp(self.d)[:, None, None]
        x = F.pixel_unshuffle(h, self.stride) if self.stride > 1 else h
        u = _SQRT2 * freq_apply(bstar.mH, x) / psi
        if self.bias is not None:
            u = u + self.bias[:, None, None]
        return _SQRT2 * freq_apply(astar, self.activation(u) * psi)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, size={self.size}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, "
            f"normalize={self.alpha is not None}"
        )
