"""Naive and compositional bounds: products and sums of rigorous per-layer norm bounds.

Lip(phi o W) <= Lip(phi) ||W||_2 with Lip(phi) = max(|alpha|, |beta|) for phi' in [alpha, beta];
a residual block y = body(z) + shortcut(z) has Lip <= Lip(body) + Lip(shortcut) (identity = 1).

Spectral norms (all are upper bounds, never power-iteration estimates):

* dense: the largest singular value from LAPACK's SVD, times (1 + 1e-10) plus a tiny absolute
  term (backward-stable SVD has error O(n eps ||W||), far below this margin);
* conv: the minimum of
  - the exact SVD of the unrolled matrix when it has at most ``DENSE_CONV_CAP`` entries,
  - the circulant embedding bound: the zero-padded (strided, dilated) convolution is
    P C E with E the isometric embedding of the input into the padded grid, C the circular
    convolution on that grid and P a selection of outputs, so ||A|| <= ||C|| =
    max over 2-D frequencies w of sigma_max(K^(w)) (K^ = FFT of the kernel, one c_out x c_in
    matrix per frequency; Sedghi, Gupta and Long, "The Singular Values of Convolutional
    Layers", ICLR 2019),
  - sqrt(||A||_1 ||A||_inf) (Holder), where |A| is the convolution with |kernel| because every
    entry of A is a single kernel tap.
  A power iteration gives the lower estimate recorded for information only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import linalg

from sdp.ir import Activation, Conv2d, Dense, Network, Op, Residual

NORM_REL_MARGIN = 1e-10
DENSE_CONV_CAP = 4_000_000
"""Unroll a convolution for an exact SVD when out_features * in_features is at most this."""


def _pad(x: float) -> float:
    return float(x) * (1 + NORM_REL_MARGIN) + 1e-300


def dense_norm(w: np.ndarray) -> float:
    """Upper bound on ||W||_2: largest singular value with a relative margin."""
    if w.size == 0:
        return 0.0
    return _pad(linalg.svdvals(w)[0])


def _abs_conv(conv: Conv2d) -> Conv2d:
    return Conv2d(
        np.abs(conv.weight),
        np.zeros_like(conv.bias),
        conv.in_shape,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
    )


def conv_holder_bound(conv: Conv2d) -> float:
    """sqrt(||A||_1 ||A||_inf) with |A| = conv(|kernel|) (max column / row sums)."""
    a = _abs_conv(conv)
    row = float(a.apply_linear(np.ones((1, conv.in_features))).max())
    col = float(a.apply_transpose(np.ones((1, conv.out_features))).max())
    return _pad(math.sqrt(row * col) * (1 + 4 * conv.in_features * np.finfo(float).eps))


def conv_circulant_bound(conv: Conv2d) -> float:
    """max_w sigma_max(FFT(kernel)(w)) on the padded grid: an upper bound on ||A||_2."""
    _, h, w = conv.in_shape
    pt, pl, pb, pr = conv.padding
    nh, nw = h + pt + pb, w + pl + pr
    co, cig, kh, kw = conv.weight.shape
    dh, dw = conv.dilation
    g = conv.groups
    grid = np.zeros((co, cig, nh, nw))
    for i in range(kh):
        for j in range(kw):
            grid[:, :, i * dh, j * dw] = conv.weight[:, :, i, j]
    spec = np.fft.fft2(grid)  # (co, cig, nh, nw)
    cog = co // g
    best = 0.0
    for gi in range(g):
        blk = spec[gi * cog : (gi + 1) * cog]  # (cog, cig, nh, nw)
        mats = np.moveaxis(blk, (0, 1), (-2, -1)).reshape(-1, cog, cig)
        sv = np.linalg.svd(mats, compute_uv=False)
        best = max(best, float(sv[:, 0].max()))
    # FFT rounding: relative error O(log(n) eps) per entry; 1e-9 covers it generously.
    return _pad(best * (1 + 1e-9))


def conv_power_estimate(conv: Conv2d, iters: int = 50, seed: int = 0) -> float:
    """Power iteration on A^T A: a LOWER estimate of ||A||_2 (information only)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((1, conv.in_features))
    est = 0.0
    for _ in range(iters):
        v /= np.linalg.norm(v)
        u = conv.apply_linear(v)
        est = float(np.linalg.norm(u))
        v = conv.apply_transpose(u)
    return est


def conv_norm(conv: Conv2d) -> tuple[float, str]:
    """Rigorous upper bound on ||conv||_2 and the name of the bound that achieved it."""
    if conv.in_features * conv.out_features <= DENSE_CONV_CAP:
        return dense_norm(conv.matrix()), "exact SVD of the unrolled matrix"
    cands = {
        "circulant embedding (FFT) bound": conv_circulant_bound(conv),
        "Holder sqrt(||A||_1 ||A||_inf) bound": conv_holder_bound(conv),
    }
    name = min(cands, key=lambda k: cands[k])
    return cands[name], name


def activation_lipschitz(phi: Activation) -> float:
    a, b = phi.slope_bounds
    return max(abs(a), abs(b))


def ops_bound(ops: tuple[Op, ...], notes: list[str]) -> float:
    """Product of per-op bounds; residual blocks add their branches (compositional)."""
    total = 1.0
    for op in ops:
        if isinstance(op, Dense):
            total *= dense_norm(op.weight)
        elif isinstance(op, Conv2d):
            val, how = conv_norm(op)
            notes.append(f"conv {op.in_shape}->{op.out_shape}: {how}")
            total *= val
        elif isinstance(op, Activation):
            total *= activation_lipschitz(op)
        elif isinstance(op, Residual):
            body = ops_bound(op.body, notes)
            short = ops_bound(op.shortcut, notes) if op.shortcut else 1.0
            total *= _pad(body + short)
    return _pad(total)


def naive_bound(net: Network) -> tuple[float, list[str]]:
    """Product of layer norm bounds (compositional for residual nets) and explanatory notes."""
    notes: list[str] = []
    value = ops_bound(net.ops, notes)
    if not net.is_chain:
        notes.insert(0, "compositional: Lip(residual block) <= Lip(body) + Lip(shortcut)")
    return value, list(dict.fromkeys(notes))
