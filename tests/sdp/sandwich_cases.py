"""Random sandwich parameters for the sandwich tests (dense and convolutional)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from sdp.ir import Activation
from sdp.sandwich.conv import ConvSandwichLayer, ConvSandwichParams
from sdp.sandwich.dense import SandwichLayer, SandwichParams


def random_params(
    rng: np.random.Generator,
    sizes: Sequence[int],
    gamma: float,
    *,
    activation: Activation | None = None,
    d_scale: float = 0.3,
) -> SandwichParams:
    """Random sandwich parameters (sizes = [n0, ..., n_out])."""
    layers = []
    for i, (p, q) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        xy = rng.standard_normal((q + p, q)) / math.sqrt(q)
        d = None if last else d_scale * rng.standard_normal(q)
        layers.append(
            SandwichLayer(
                "sandwich_output" if last else "sandwich",
                xy,
                0.1 * rng.standard_normal(q),
                d,
                None,
                None if last else (activation or Activation("relu")),
            )
        )
    return SandwichParams(float(gamma), tuple(layers), (int(sizes[0]),), float(gamma))


def random_conv_params(
    rng: np.random.Generator,
    input_shape: tuple[int, int, int],
    layers: list[tuple[int, int]],
    n_out: int,
    gamma: float,
    *,
    kernel_size: int = 3,
    d_scale: float = 0.3,
) -> ConvSandwichParams:
    """Random conv sandwich parameters: ``layers`` = [(out_channels, stride), ...]."""

    cur = input_shape
    convs = []
    for q, s in layers:
        p = cur[0] * s * s
        xy = rng.standard_normal((q + p, q, kernel_size, kernel_size)) / (
            kernel_size * math.sqrt(q)
        )
        layer = ConvSandwichLayer(
            xy, 0.1 * rng.standard_normal(q), d_scale * rng.standard_normal(q), cur, s
        )
        convs.append(layer)
        cur = layer.out_shape
    n_in = math.prod(cur)
    out = SandwichLayer(
        "sandwich_output",
        rng.standard_normal((n_out + n_in, n_out)) / math.sqrt(n_out),
        0.1 * rng.standard_normal(n_out),
    )
    return ConvSandwichParams(float(gamma), tuple(convs), out, input_shape, float(gamma))
