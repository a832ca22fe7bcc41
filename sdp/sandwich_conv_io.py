"""Conv sandwich files: the lipcert/1 "sandwich" config with "sandwich_conv" hidden layers.

Untrusted input: every field is validated, sizes are budgeted (exported weights and Cayley
work) before any tensor is read, and nothing is executed. The maths is in
:mod:`sdp.sandwich_conv`; :func:`sdp.sandwich.network_from_safetensors` dispatches here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdp.errors import ModelRejected
from sdp.ir import Activation, Network
from sdp.sandwich_conv import (
    DENSE_EXPORT_MAX,
    ConvSandwichLayer,
    ConvSandwichParams,
    plain_network,
)

MAX_GRID = 256
MAX_CHANNELS = 512
MAX_EXPORT_ENTRIES = 1 << 25
"""Untrusted files: at most this many float64 entries in the exported plain ops (256 MiB)."""
MAX_FREQUENCY_WORK = 1 << 32
"""Untrusted files: at most this many flops (sum over layers of F (q + p) q^2) in the Cayley."""


def is_conv_config(config: Mapping[str, Any]) -> bool:
    layers = config.get("layers") if isinstance(config, Mapping) else None
    return isinstance(layers, list) and any(
        isinstance(s, Mapping) and s.get("type") == "sandwich_conv" for s in layers
    )


def _reject(detail: str, code: str = "invalid-config") -> ModelRejected:
    return ModelRejected(detail, code=code)


def params_from_safetensors(
    tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> ConvSandwichParams:
    """Validate a conv "sandwich" config (untrusted input). Config::

    {"format": "lipcert/1", "kind": "sandwich", "gamma": 2.0, "input_shape": [1, 28, 28],
     "tensors": {"log_gamma": "log_gamma"},
     "layers": [{"type": "sandwich_conv", "in_shape": [1, 28, 28], "out_channels": 8,
                 "kernel_size": 3, "stride": 1, "activation": "relu",
                 "tensors": {"XY": ..., "d": ..., "b": ..., "alpha": ...}}, ...,
                {"type": "sandwich", "in": 6272, "out": 64, ...}, ...,   # optional, dense
                {"type": "sandwich_output", "in": 64, "out": 10, "tensors": {...}}]}
    """
    from sdp import sandwich as dense  # the dense module dispatches here; import lazily

    claimed = dense._float(config.get("gamma"), "gamma", positive=True)
    shape = config.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise _reject("a conv sandwich input_shape must be [channels, n, n]")
    c0, n0, n1 = (dense._int(v, "input_shape entry") for v in shape)
    input_shape = (c0, n0, n1)
    top = config.get("tensors", {}) or {}
    if not isinstance(top, Mapping):
        raise _reject("tensors must be an object")
    gamma = claimed
    if "log_gamma" in top:
        gamma = math.exp(float(dense._tensor(tensors, top["log_gamma"], (1,), "log_gamma")[0]))
        if not (math.isfinite(gamma) and gamma > 0):
            raise _reject("log_gamma gives a non-finite scale")
    specs = config.get("layers")
    assert isinstance(specs, list)
    cur = input_shape
    convs: list[ConvSandwichLayer] = []
    cost = (0, 0)
    n_conv = 0
    while n_conv < len(specs) - 1 and _is_conv(specs[n_conv]):
        n_conv += 1
    if n_conv == 0:
        raise _reject("layer 0: conv sandwich files start with 'sandwich_conv' layers")
    for i, spec in enumerate(specs[:n_conv]):
        what = f"layer {i}"
        in_shape = tuple(dense._int(v, f"{what} in_shape") for v in spec.get("in_shape") or [])
        if in_shape != cur:
            raise _reject(f"{what} expects input {in_shape} but receives {cur}", "shape-mismatch")
        c, n, n2 = cur
        s = spec.get("stride", 1)
        if s not in (1, 2) or isinstance(s, bool) or n != n2 or n % s or n > MAX_GRID:
            raise _reject(f"{what}: needs a square grid <= {MAX_GRID}, stride 1|2 dividing it")
        q = dense._int(spec.get("out_channels"), f"{what} out_channels")
        k = dense._int(spec.get("kernel_size"), f"{what} kernel_size")
        if q > MAX_CHANNELS or c * s * s > MAX_CHANNELS or k > n // s:
            raise _reject(f"{what}: too many channels or kernel larger than the grid")
        entries, work = (a + b for a, b in zip(cost, _layer_cost(c, n, q, s), strict=True))
        cost = (entries, work)
        if entries > MAX_EXPORT_ENTRIES or work > MAX_FREQUENCY_WORK:
            raise _reject(
                f"conv sandwich too large: {entries} exported weights (max "
                f"{MAX_EXPORT_ENTRIES}), {work} Cayley flops (max {MAX_FREQUENCY_WORK})",
                "too-many-parameters",
            )
        ts = spec.get("tensors")
        if not isinstance(ts, Mapping):
            raise _reject(f"{what}: tensors must be an object")
        p = c * s * s
        xy = dense._tensor(tensors, ts.get("XY"), (q + p, q, k, k), f"{what} XY")
        b = dense._tensor(tensors, ts["b"], (q,), f"{what} b") if "b" in ts else np.zeros(q)
        d = dense._tensor(tensors, ts.get("d"), (q,), f"{what} d")
        if np.max(np.abs(d)) > 300:
            raise _reject(f"{what}: |d| > 300 overflows exp(d)", "non-finite")
        alpha = None
        if "alpha" in ts:
            alpha = float(dense._tensor(tensors, ts["alpha"], (1,), f"{what} alpha")[0])
        try:
            act = Activation(
                spec.get("activation", "relu"),
                dense._float(spec.get("activation_param", 0.0), f"{what} param"),
            )
        except (ValueError, TypeError) as e:
            raise _reject(f"{what}: {e}", "unsupported-activation") from e
        layer = ConvSandwichLayer(xy, b, d, (c, n, n), int(s), alpha, act)
        convs.append(layer)
        cur = layer.out_shape
    # the rest: optional dense "sandwich" layers on the flattened image, then the output layer
    # (validated by the dense parser, which rejects anything else, e.g. a later conv layer)
    tail_cfg = dict(config)
    tail_cfg["input_shape"] = [math.prod(cur)]
    tail_cfg["layers"] = specs[n_conv:]
    tail = dense.params_from_safetensors(tensors, tail_cfg)
    return ConvSandwichParams(
        gamma, tuple(convs), tail.output, input_shape, claimed, dense=tail.hidden
    )


def _is_conv(spec: Any) -> bool:
    return isinstance(spec, Mapping) and spec.get("type") == "sandwich_conv"


def _layer_cost(c: int, n: int, q: int, s: int) -> tuple[int, int]:
    """(exported float64 entries, Cayley flops) of one conv sandwich layer."""
    m = n // s
    dense = q * m * m * c * n * n
    entries = dense if dense <= DENSE_EXPORT_MAX else q * c * (2 * n - s) ** 2
    return entries, m * (m // 2 + 1) * (q + c * s * s) * q * q


def network_from_safetensors(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> Network:
    params = params_from_safetensors(tensors, config)
    try:
        return plain_network(params)
    except (ValueError, np.linalg.LinAlgError) as e:
        raise _reject(f"cannot build the conv sandwich network: {e}") from e


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
    """Random parameters for tests: ``layers`` = [(out_channels, stride), ...]."""
    from sdp.sandwich import SandwichLayer

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
