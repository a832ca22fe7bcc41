"""Size caps for untrusted model files, checked before and after parsing.

Before parsing: the byte size (``max_bytes``) and, per format, header-declared sizes
(tensor element counts, node counts). After building the IR: parameters, width, depth.
Every violation raises :class:`~sdp.errors.ModelRejected` with a stable code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sdp.errors import ModelRejected
from sdp.ir import Activation, Conv2d, Dense, Network, Op, Residual

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Caps on an imported model (all inclusive).

    max_bytes: size of the uploaded file; max_parameters: weights + biases over all layers;
    max_width: features at the input or output of any op; max_depth: number of ops
    (residual bodies counted); max_nodes: ONNX graph nodes / safetensors layers / .mat cells;
    max_tensor_elements: elements of any single stored tensor (guards allocations from
    headers that lie about their sizes).
    """

    max_bytes: int = 256 * MiB
    max_parameters: int = 50_000_000
    max_width: int = 65_536
    max_depth: int = 256
    max_nodes: int = 4_096
    max_tensor_elements: int = 50_000_000

    def check_bytes(self, size: int) -> None:
        if size > self.max_bytes:
            raise ModelRejected(
                f"model file is {size} bytes; the limit is {self.max_bytes} bytes",
                code="too-large",
            )

    def check_nodes(self, count: int, what: str = "nodes") -> None:
        if count > self.max_nodes:
            raise ModelRejected(
                f"model has {count} {what}; the limit is {self.max_nodes}", code="too-many-nodes"
            )

    def check_tensor(self, name: str, shape: Iterable[int]) -> None:
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise ModelRejected(
                f"tensor {name!r} has a negative dimension {dims}", code="malformed"
            )
        n = math.prod(dims)
        if n > self.max_tensor_elements:
            raise ModelRejected(
                f"tensor {name!r} has {n} elements; the limit is {self.max_tensor_elements}",
                code="too-many-parameters",
            )

    def check_network(self, net: Network) -> None:
        """Parameters, width and depth of a built network."""
        if net.num_parameters > self.max_parameters:
            raise ModelRejected(
                f"model has {net.num_parameters} parameters; the limit is {self.max_parameters}",
                code="too-many-parameters",
            )
        depth = _depth(net.ops)
        if depth > self.max_depth:
            raise ModelRejected(
                f"model has {depth} layers; the limit is {self.max_depth}", code="too-deep"
            )
        width = max([net.input_size, *_widths(net.ops)])
        if width > self.max_width:
            raise ModelRejected(
                f"a layer has {width} features; the limit is {self.max_width}", code="too-wide"
            )

    def check_width(self, width: int, where: str) -> None:
        """Early check while building (before large matrices are formed)."""
        if width > self.max_width:
            raise ModelRejected(
                f"{where} has {width} features; the limit is {self.max_width}", code="too-wide"
            )


def _depth(ops: tuple[Op, ...]) -> int:
    total = 0
    for op in ops:
        total += _depth(op.body) + _depth(op.shortcut) if isinstance(op, Residual) else 1
    return total


def _widths(ops: tuple[Op, ...]) -> list[int]:
    out: list[int] = []
    for op in ops:
        if isinstance(op, Dense | Conv2d):
            out.append(op.out_features)
        elif isinstance(op, Residual):
            out.extend(_widths(op.body) + _widths(op.shortcut))
        else:
            assert isinstance(op, Activation)
    return out
