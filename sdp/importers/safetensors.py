"""safetensors + a JSON config in the metadata (key ``"lipcert"``), read and written safely.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length
n, n bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the raw tensor bytes. The header is validated here before
``safetensors.numpy.load`` reads the data (which executes no code).

Config (``metadata["lipcert"]``)::

    {"format": "lipcert/1", "kind": "feedforward", "input_shape": [1, 28, 28],
     "layers": [{"type": "conv2d", "weight": "l0.w", "bias": "l0.b", "stride": [2, 2],
                 "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1},
                {"type": "activation", "name": "relu", "param": 0.0},
                {"type": "flatten"},
                {"type": "dense", "weight": "l2.w", "bias": "l2.b"},
                {"type": "residual", "body": [...], "shortcut": [...]}]}

``kind: "sandwich"`` is delegated to :func:`sdp.sandwich.config.network_from_safetensors`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdp.errors import ModelRejected
from sdp.importers.limits import Limits
from sdp.ir import Activation, Conv2d, Dense, Network, Op, Residual
from sdp.sandwich.config import network_from_safetensors

METADATA_KEY = "lipcert"
FORMAT = "lipcert/1"
_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
}
_MAX_NESTING = 8


def load_safetensors(data: bytes, limits: Limits, name: str = "") -> Network:
    """Network from safetensors bytes carrying a lipcert/1 config."""
    header = _header(data, limits)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise ModelRejected(
            f"safetensors file has no '{METADATA_KEY}' metadata describing the network; "
            "see sdp.importers.safetensors for the config format",
            code="missing-config",
        )
    try:
        config = json.loads(meta[METADATA_KEY])
    except (TypeError, ValueError) as exc:
        raise ModelRejected(f"lipcert metadata is not JSON: {exc}", code="invalid-config") from exc
    if not isinstance(config, dict):
        raise ModelRejected("lipcert metadata must be a JSON object", code="invalid-config")
    if config.get("format", FORMAT) != FORMAT:
        raise ModelRejected(
            f"unknown config format {config.get('format')!r}", code="invalid-config"
        )
    try:
        from safetensors.numpy import load

        tensors = load(data)
    except Exception as exc:  # SafetensorError and friends
        raise ModelRejected(f"unreadable safetensors data: {exc}", code="malformed") from exc
    kind = config.get("kind")
    net = _build(kind, tensors, config, limits, str(config.get("name") or name))
    limits.check_network(net)
    return net


def _build(
    kind: Any, tensors: dict[str, np.ndarray], config: dict[str, Any], limits: Limits, name: str
) -> Network:
    if kind == "feedforward":
        shape = _shape(config.get("input_shape"), "input_shape")
        limits.check_width(math.prod(shape), "the network input")
        layers = config.get("layers")
        ops, _ = _layers(layers, tensors, shape, limits, depth=0)
        try:
            return Network(shape, ops, name=name)
        except ValueError as exc:
            raise ModelRejected(f"inconsistent network: {exc}", code="shape-mismatch") from exc
    if kind == "sandwich":
        try:
            net = network_from_safetensors(tensors, config)
        except ModelRejected:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelRejected(f"invalid sandwich config: {exc}", code="invalid-config") from exc
        return net if not name or net.name else _renamed(net, name)
    raise ModelRejected(
        f"unsupported config kind {kind!r} (feedforward | sandwich)", code="unsupported-kind"
    )


def _renamed(net: Network, name: str) -> Network:
    return Network(net.input_shape, net.ops, sandwich=net.sandwich, name=name)


def _header(data: bytes, limits: Limits) -> dict[str, Any]:
    if len(data) < 8:
        raise ModelRejected("safetensors file is shorter than its header", code="malformed")
    (n,) = struct.unpack_from("<Q", data)
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ModelRejected("safetensors header length exceeds the file", code="malformed")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelRejected(f"safetensors header is not JSON: {exc}", code="malformed") from exc
    if not isinstance(header, dict):
        raise ModelRejected("safetensors header is not a JSON object", code="malformed")
    body = len(data) - 8 - n
    limits.check_nodes(len(header) - 1, "tensors")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise ModelRejected(f"tensor {key!r}: bad header entry", code="malformed")
        dtype, shape, offs = info.get("dtype"), info["shape"], info.get("data_offsets")
        if dtype not in _DTYPES:
            raise ModelRejected(
                f"tensor {key!r} has unsupported dtype {dtype!r}", code="unsupported-dtype"
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ModelRejected(f"tensor {key!r} has a bad shape {shape}", code="malformed")
        limits.check_tensor(key, shape)
        ok = (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            and 0 <= offs[0] <= offs[1] <= body
        )
        if not ok or offs[1] - offs[0] != math.prod(shape) * _DTYPES[dtype]:  # type: ignore[index]
            raise ModelRejected(
                f"tensor {key!r}: data offsets {offs} do not match its shape "
                f"{shape} and dtype {dtype}",
                code="shape-mismatch",
            )
    return header


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(v, list)
        or not v
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)
    ):
        raise ModelRejected(
            f"{what} must be a non-empty list of positive ints, got {v!r}", code="invalid-config"
        )
    return tuple(v)


def _tensor(tensors: Mapping[str, np.ndarray], key: Any, what: str) -> np.ndarray:
    if not isinstance(key, str) or key not in tensors:
        raise ModelRejected(f"{what}: tensor {key!r} is missing", code="missing-tensor")
    arr = np.asarray(tensors[key]).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ModelRejected(f"{what}: tensor {key!r} has NaN or inf entries", code="non-finite")
    return arr


def _ints(v: Any, n: int, default: tuple[int, ...], what: str) -> tuple[int, ...]:
    if v is None:
        return default
    vals = [v] * n if isinstance(v, int) else v
    if (
        not isinstance(vals, list | tuple)
        or len(vals) not in (n, n // 2 or n)
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in vals)
    ):
        raise ModelRejected(
            f"{what}: expected {n} non-negative ints, got {v!r}", code="invalid-config"
        )
    return tuple(vals) if len(vals) == n else tuple(vals) * 2


def _layers(
    layers: Any,
    tensors: Mapping[str, np.ndarray],
    shape: tuple[int, ...],
    limits: Limits,
    depth: int,
) -> tuple[tuple[Op, ...], tuple[int, ...]]:
    """IR ops of a layer list, and the output shape; ``shape`` is the current tensor shape."""
    if not isinstance(layers, list) or depth > _MAX_NESTING:
        raise ModelRejected(
            "config 'layers' must be a list (nested at most 8 deep)", code="invalid-config"
        )
    limits.check_nodes(len(layers), "layers")
    ops: list[Op] = []
    for i, layer in enumerate(layers):
        what = f"layers[{i}]"
        if not isinstance(layer, dict):
            raise ModelRejected(f"{what} must be an object", code="invalid-config")
        kind = layer.get("type")
        try:
            op, shape = _layer(kind, layer, tensors, shape, limits, depth, what)
        except ValueError as exc:
            raise ModelRejected(f"{what}: {exc}", code="shape-mismatch") from exc
        if op is not None:
            ops.append(op)
    return tuple(ops), shape


def _layer(
    kind: Any,
    layer: dict[str, Any],
    tensors: Mapping[str, np.ndarray],
    shape: tuple[int, ...],
    limits: Limits,
    depth: int,
    what: str,
) -> tuple[Op | None, tuple[int, ...]]:
    size = math.prod(shape)
    if kind == "dense":
        w = _tensor(tensors, layer.get("weight"), what)
        b = (
            np.zeros(w.shape[0])
            if layer.get("bias") is None
            else _tensor(tensors, layer["bias"], what).ravel()
        )
        if w.ndim != 2 or w.shape[1] != size:
            raise ModelRejected(
                f"{what}: weight {w.shape} does not take {size} inputs", code="shape-mismatch"
            )
        limits.check_width(w.shape[0], what)
        return Dense(w, b), (w.shape[0],)
    if kind == "conv2d":
        w = _tensor(tensors, layer.get("weight"), what)
        declared = layer.get("in_shape")
        in_shape = shape if declared is None else _shape(declared, f"{what}.in_shape")
        if len(in_shape) != 3 or math.prod(in_shape) != size or w.ndim != 4:
            raise ModelRejected(
                f"{what}: cannot apply weight {w.shape} to input {shape}", code="shape-mismatch"
            )
        b = (
            np.zeros(w.shape[0])
            if layer.get("bias") is None
            else _tensor(tensors, layer["bias"], what).ravel()
        )
        groups = layer.get("groups", 1)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ModelRejected(f"{what}: bad groups {groups!r}", code="invalid-config")
        conv = Conv2d(
            w,
            b,
            (in_shape[0], in_shape[1], in_shape[2]),
            _ints(layer.get("stride"), 2, (1, 1), what),  # type: ignore[arg-type]
            _ints(layer.get("padding"), 4, (0, 0, 0, 0), what),  # type: ignore[arg-type]
            _ints(layer.get("dilation"), 2, (1, 1), what),  # type: ignore[arg-type]
            groups,
        )
        if min(conv.stride + conv.dilation) < 1:
            raise ModelRejected(f"{what}: stride and dilation must be >= 1", code="invalid-config")
        limits.check_width(conv.out_features, what)
        return conv, conv.out_shape
    if kind == "activation":
        param = layer.get("param", 0.0)
        if not isinstance(param, int | float) or isinstance(param, bool):
            raise ModelRejected(f"{what}: bad param {param!r}", code="invalid-config")
        try:
            return Activation(layer.get("name"), float(param)), shape  # type: ignore[arg-type]
        except ValueError as exc:
            raise ModelRejected(f"{what}: {exc}", code="invalid-config") from exc
    if kind == "flatten":
        return None, (size,)
    if kind == "residual":
        body, out_b = _layers(layer.get("body"), tensors, shape, limits, depth + 1)
        short, out_s = _layers(layer.get("shortcut", []), tensors, shape, limits, depth + 1)
        if math.prod(out_b) != math.prod(out_s):
            raise ModelRejected(f"{what}: branches give {out_b} and {out_s}", code="shape-mismatch")
        return Residual(body, short), out_b
    raise ModelRejected(f"{what}: unknown layer type {kind!r}", code="invalid-config")


def save_safetensors(net: Network, path: str | Path | None = None) -> bytes:
    """Serialise ``net`` (dense/conv/activation/residual ops) as feedforward lipcert/1 bytes.

    Weights are stored in float64, so loading gives back exactly the same network
    (same :meth:`~sdp.ir.Network.content_hash`). Sandwich parameters are not stored (the
    forward map is); use ``models.io`` for sandwich files. Writes ``path`` when given.
    """
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    layers = _describe(net.ops, tensors, "layers")
    config = {
        "format": FORMAT,
        "kind": "feedforward",
        "input_shape": list(net.input_shape),
        "layers": layers,
    }
    if net.name:
        config["name"] = net.name
    data = save(tensors, metadata={METADATA_KEY: json.dumps(config)})
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _describe(ops: tuple[Op, ...], tensors: dict[str, np.ndarray], prefix: str) -> list[Any]:
    out: list[Any] = []
    for i, op in enumerate(ops):
        key = f"{prefix}.{i}"
        if isinstance(op, Activation):
            out.append({"type": "activation", "name": op.name, "param": op.param})
        elif isinstance(op, Residual):
            out.append(
                {
                    "type": "residual",
                    "body": _describe(op.body, tensors, f"{key}.body"),
                    "shortcut": _describe(op.shortcut, tensors, f"{key}.shortcut"),
                }
            )
        else:
            tensors[f"{key}.weight"] = np.ascontiguousarray(op.weight)
            tensors[f"{key}.bias"] = np.ascontiguousarray(op.bias)
            entry: dict[str, Any] = {"weight": f"{key}.weight", "bias": f"{key}.bias"}
            if isinstance(op, Conv2d):
                entry.update(
                    type="conv2d",
                    in_shape=list(op.in_shape),
                    stride=list(op.stride),
                    padding=list(op.padding),
                    dilation=list(op.dilation),
                    groups=op.groups,
                )
            else:
                entry["type"] = "dense"
            out.append(entry)
    return out
