"""Sandwich safetensors files: the lipcert/1 "sandwich" config, dense and convolutional.

Untrusted input: every field is validated, conv sizes are budgeted (exported weights and
Cayley work) before any tensor is read, and nothing is executed. A config whose layers include
"sandwich_conv" ones is a conv LBDN (:class:`sdp.sandwich.conv.ConvSandwichParams`), else a
dense one (:class:`sdp.sandwich.dense.SandwichParams`); :func:`network_from_safetensors` is the
front door for both. The maths is in :mod:`sdp.sandwich.dense` and :mod:`sdp.sandwich.conv`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import linalg

from sdp.errors import ModelRejected
from sdp.ir import Activation, Array, Network
from sdp.sandwich.conv import DENSE_EXPORT_MAX, ConvSandwichLayer, ConvSandwichParams
from sdp.sandwich.conv import plain_network as conv_plain_network
from sdp.sandwich.dense import SandwichLayer, SandwichParams, plain_network

CONFIG_FORMAT = "lipcert/1"
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


def conv_params_from_safetensors(
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
    claimed = _float(config.get("gamma"), "gamma", positive=True)
    shape = config.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise _reject("a conv sandwich input_shape must be [channels, n, n]")
    c0, n0, n1 = (_int(v, "input_shape entry") for v in shape)
    input_shape = (c0, n0, n1)
    gamma = _scale(tensors, config, claimed)
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
        in_shape = tuple(_int(v, f"{what} in_shape") for v in spec.get("in_shape") or [])
        if in_shape != cur:
            raise _reject(f"{what} expects input {in_shape} but receives {cur}", "shape-mismatch")
        c, n, n2 = cur
        s = spec.get("stride", 1)
        if s not in (1, 2) or isinstance(s, bool) or n != n2 or n % s or n > MAX_GRID:
            raise _reject(f"{what}: needs a square grid <= {MAX_GRID}, stride 1|2 dividing it")
        q = _int(spec.get("out_channels"), f"{what} out_channels")
        k = _int(spec.get("kernel_size"), f"{what} kernel_size")
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
        xy = _tensor(tensors, ts.get("XY"), (q + p, q, k, k), f"{what} XY")
        b = _tensor(tensors, ts["b"], (q,), f"{what} b") if "b" in ts else np.zeros(q)
        d = _log_scales(tensors, ts, q, what)
        alpha = _alpha(tensors, ts, what)
        act = _activation(spec, what)
        layer = ConvSandwichLayer(xy, b, d, (c, n, n), int(s), alpha, act)
        convs.append(layer)
        cur = layer.out_shape
    # the rest: optional dense "sandwich" layers on the flattened image, then the output layer
    # (validated by the dense parser, which rejects anything else, e.g. a later conv layer)
    tail_cfg = dict(config)
    tail_cfg["input_shape"] = [math.prod(cur)]
    tail_cfg["layers"] = specs[n_conv:]
    tail = params_from_safetensors(tensors, tail_cfg)
    return ConvSandwichParams(
        gamma, tuple(convs), tail.output, input_shape, claimed, dense=tail.hidden
    )


def _is_conv(spec: Any) -> bool:
    return isinstance(spec, Mapping) and spec.get("type") == "sandwich_conv"


def _layer_cost(c: int, n: int, q: int, s: int) -> tuple[int, int]:
    """(exported float64 entries, Cayley flops) of one conv sandwich layer."""
    m = n // s
    unrolled = q * m * m * c * n * n
    entries = unrolled if unrolled <= DENSE_EXPORT_MAX else q * c * (2 * n - s) ** 2
    return entries, m * (m // 2 + 1) * (q + c * s * s) * q * q


def _reject(detail: str, code: str = "invalid-config") -> ModelRejected:
    return ModelRejected(detail, code=code)


def _scale(tensors: Mapping[str, Any], config: Mapping[str, Any], claimed: float) -> float:
    """The network's scale: exp(log_gamma) when ``config["tensors"]`` names that tensor, else
    the claimed gamma (dense and conv sandwich files alike)."""
    top = config.get("tensors", {}) or {}
    if not isinstance(top, Mapping):
        raise _reject("tensors must be an object")
    if "log_gamma" not in top:
        return claimed
    gamma = math.exp(float(_tensor(tensors, top["log_gamma"], (1,), "log_gamma")[0]))
    if not (math.isfinite(gamma) and gamma > 0):
        raise _reject("log_gamma gives a non-finite scale")
    return gamma


def _tensor(tensors: Mapping[str, Any], name: Any, shape: tuple[int, ...], what: str) -> Array:
    if not isinstance(name, str) or name not in tensors:
        raise _reject(f"{what}: tensor {name!r} is missing", "missing-tensor")
    arr = np.asarray(tensors[name])
    if arr.dtype.kind not in "fiu":
        raise _reject(f"{what}: tensor {name!r} is not numeric", "unsupported-dtype")
    arr = arr.astype(np.float64)
    if arr.shape != shape and not (arr.size == 1 and math.prod(shape) == 1):
        raise _reject(
            f"{what}: tensor {name!r} has shape {arr.shape}, expected {shape}", "shape-mismatch"
        )
    if not np.all(np.isfinite(arr)):
        raise _reject(f"{what}: tensor {name!r} has non-finite values", "non-finite")
    return arr.reshape(shape)


def _log_scales(tensors: Mapping[str, Any], ts: Mapping[str, Any], q: int, what: str) -> Array:
    """The (q,) tensor ``d`` of a hidden layer, Psi = diag(exp(d)) in
    h_out = sqrt(2) A^T Psi sigma(sqrt(2) Psi^{-1} B h_in + b) (:mod:`sdp.sandwich.dense`):
    finite, and |d| <= 300 so that exp(+-d) stays finite."""
    d = _tensor(tensors, ts.get("d"), (q,), f"{what} d")
    if np.max(np.abs(d)) > 300:
        raise _reject(f"{what}: |d| > 300 overflows exp(d)", "non-finite")
    return d


def _alpha(tensors: Mapping[str, Any], ts: Mapping[str, Any], what: str) -> float | None:
    """The optional scalar tensor ``alpha`` of a layer (None: no rescaling)."""
    if "alpha" not in ts:
        return None
    return float(_tensor(tensors, ts["alpha"], (1,), f"{what} alpha")[0])


def _activation(spec: Mapping[str, Any], what: str) -> Activation:
    """The activation of a hidden layer: ``activation`` (default relu) and its
    ``activation_param`` (default 0), refused with ``unsupported-activation``."""
    try:
        return Activation(
            spec.get("activation", "relu"),
            _float(spec.get("activation_param", 0.0), f"{what} param"),
        )
    except (ValueError, TypeError) as e:
        raise _reject(f"{what}: {e}", "unsupported-activation") from e


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _reject(f"{what} must be a positive integer, got {v!r}")
    return v


def _float(v: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _reject(f"{what} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _reject(f"{what} must be > 0, got {v!r}")
    return float(v)


def params_from_safetensors(
    tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> SandwichParams:
    """Validate a "sandwich" lipcert/1 config against its tensors (untrusted input).

    Config::

        {"format": "lipcert/1", "kind": "sandwich", "gamma": 5.0, "input_shape": [784],
         "tensors": {"log_gamma": "log_gamma"},            # optional: the forward's scale
         "layers": [{"type": "sandwich", "in": 784, "out": 64, "activation": "relu",
                     "activation_param": 0.0,
                     "tensors": {"XY": ..., "alpha": ..., "d": ..., "b": ...}}, ...,
                    {"type": "sandwich_output", "in": 64, "out": 10,
                     "tensors": {"XY": ..., "alpha": ..., "b": ...}}]}

    ``alpha`` and ``b`` are optional (no rescaling; zero bias). The scale is exp(log_gamma)
    when that tensor is given, else ``gamma``; ``gamma`` is always the claim.
    """
    if not isinstance(config, Mapping):
        raise _reject("config must be a JSON object")
    if config.get("format") != CONFIG_FORMAT or config.get("kind") != "sandwich":
        raise _reject(f"expected format {CONFIG_FORMAT!r} and kind 'sandwich'")
    claimed = _float(config.get("gamma"), "gamma", positive=True)
    shape_raw = config.get("input_shape")
    if not isinstance(shape_raw, list) or not shape_raw:
        raise _reject("input_shape must be a non-empty list")
    input_shape = tuple(_int(v, "input_shape entry") for v in shape_raw)
    gamma = _scale(tensors, config, claimed)
    specs = config.get("layers")
    if not isinstance(specs, list) or not specs:
        raise _reject("layers must be a non-empty list")
    layers: list[SandwichLayer] = []
    n = math.prod(input_shape)
    for i, spec in enumerate(specs):
        what = f"layer {i}"
        if not isinstance(spec, Mapping):
            raise _reject(f"{what} must be an object")
        kind = spec.get("type")
        last = i == len(specs) - 1
        if kind != ("sandwich_output" if last else "sandwich"):
            raise _reject(
                f"{what}: type {kind!r}; expected hidden 'sandwich' layers then one "
                "'sandwich_output'",
                "unsupported-layer",
            )
        p, q = _int(spec.get("in"), f"{what} in"), _int(spec.get("out"), f"{what} out")
        if p != n:
            raise _reject(f"{what} expects {p} inputs but receives {n}", "shape-mismatch")
        ts = spec.get("tensors")
        if not isinstance(ts, Mapping):
            raise _reject(f"{what}: tensors must be an object")
        xy = _tensor(tensors, ts.get("XY"), (q + p, q), f"{what} XY")
        b = _tensor(tensors, ts["b"], (q,), f"{what} b") if "b" in ts else np.zeros(q)
        alpha = _alpha(tensors, ts, what)
        d = act = None
        if not last:
            d = _log_scales(tensors, ts, q, what)
            act = _activation(spec, what)
        layers.append(SandwichLayer(kind, xy, b, d, alpha, act))
        n = q
    return SandwichParams(gamma, tuple(layers), input_shape, claimed)


def network_from_safetensors(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> Network:
    """The plain IR network of a sandwich safetensors file, with ``Network.sandwich`` set."""
    if is_conv_config(config):
        conv_params = conv_params_from_safetensors(tensors, config)
        try:
            return conv_plain_network(conv_params)
        except (ValueError, np.linalg.LinAlgError) as e:
            raise _reject(f"cannot build the conv sandwich network: {e}") from e
    params = params_from_safetensors(tensors, config)
    try:
        return plain_network(params)
    except (ValueError, linalg.LinAlgError) as e:
        raise _reject(f"cannot build the sandwich network: {e}") from e


def params_to_safetensors(params: SandwichParams) -> tuple[dict[str, Array], dict[str, Any]]:
    """(tensors, config) of :func:`params_from_safetensors`'s format (float64 tensors)."""
    tensors: dict[str, Array] = {"log_gamma": np.array([math.log(params.gamma)])}
    specs: list[dict[str, Any]] = []
    for i, layer in enumerate(params.layers):
        pre = f"layers.{i}."
        ts = {"XY": pre + "XY", "b": pre + "b"}
        tensors[pre + "XY"] = layer.xy
        tensors[pre + "b"] = layer.b
        if layer.alpha is not None:
            ts["alpha"] = pre + "alpha"
            tensors[pre + "alpha"] = np.array([layer.alpha])
        spec: dict[str, Any] = {
            "type": layer.type,
            "in": layer.in_features,
            "out": layer.out_features,
            "tensors": ts,
        }
        if layer.d is not None:
            ts["d"] = pre + "d"
            tensors[pre + "d"] = layer.d
            act = layer.activation or Activation("relu")
            spec["activation"], spec["activation_param"] = act.name, act.param
        specs.append(spec)
    claim = params.claimed_gamma if params.claimed_gamma is not None else params.gamma
    config = {
        "format": CONFIG_FORMAT,
        "kind": "sandwich",
        "gamma": claim,
        "input_shape": list(params.input_shape),
        "tensors": {"log_gamma": "log_gamma"},
        "layers": specs,
    }
    return tensors, config


def config_json(config: Mapping[str, Any]) -> str:
    """The metadata string stored under the safetensors key "lipcert"."""
    return json.dumps(config, separators=(",", ":"))
