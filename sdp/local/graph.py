"""The IR as a small DAG of vector nodes, the form bound propagation walks.

Nodes are numbered in topological order (parents before children):

    input            x (the ball's centre and radius live outside the graph)
    affine(p, op)    W z_p + b            (Dense or Conv2d, a linear operator with shape data)
    act(p, phi)      phi(z_p) elementwise
    add(p, q)        z_p + z_q            (the join of a Residual's body and shortcut)

A :class:`sdp.ir.Residual` with input node p becomes its body's nodes from p, its shortcut's
nodes from p (an empty shortcut is p itself) and one ``add``; nesting is handled recursively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

from sdp.ir import Activation, Array, Conv2d, Dense, Network, Op, Residual

NodeKind = Literal["input", "affine", "act", "add"]


@dataclass(frozen=True, eq=False)
class Node:
    """One vector of the network: ``size`` entries computed from ``parents``."""

    index: int
    kind: NodeKind
    parents: tuple[int, ...]
    size: int
    op: Dense | Conv2d | Activation | None = None

    @cached_property
    def abs_op(self) -> Dense | Conv2d:
        """The affine op with |W| and zero bias (for error and interval radii)."""
        op = self.op
        if isinstance(op, Dense):
            return Dense(np.abs(op.weight), np.zeros(op.out_features))
        if isinstance(op, Conv2d):
            return Conv2d(
                np.abs(op.weight),
                np.zeros_like(op.bias),
                op.in_shape,
                op.stride,
                op.padding,
                op.dilation,
                op.groups,
            )
        raise TypeError("abs_op of a non-affine node")

    @cached_property
    def full_bias(self) -> Array:
        """The bias as a vector of length ``size`` (a conv bias repeated over positions)."""
        op = self.op
        if isinstance(op, Dense):
            return op.bias
        if isinstance(op, Conv2d):
            _, ho, wo = op.out_shape
            return np.repeat(op.bias, ho * wo)
        raise TypeError("full_bias of a non-affine node")

    @property
    def terms_forward(self) -> int:
        """Products summed per output entry of the linear part (+1 for the accumulator)."""
        op = self.op
        if isinstance(op, Dense):
            return op.in_features + 1
        assert isinstance(op, Conv2d)
        _, cig, kh, kw = op.weight.shape
        return cig * kh * kw + 1

    @property
    def terms_transpose(self) -> int:
        """Products summed per entry of the adjoint (W^T y)."""
        op = self.op
        if isinstance(op, Dense):
            return op.out_features + 1
        assert isinstance(op, Conv2d)
        co, _, kh, kw = op.weight.shape
        return (co // op.groups) * kh * kw + 1

    def linear(self, z: Array) -> Array:
        """W z for z of shape (..., in) -> (..., out) (float, rounded)."""
        op = self.op
        assert isinstance(op, Dense | Conv2d)
        lead = z.shape[:-1]
        if isinstance(op, Dense):
            return np.asarray(z @ op.weight.T)
        out = op.apply_linear(z.reshape(-1, z.shape[-1]))
        return out.reshape(*lead, -1)

    def abs_linear(self, z: Array) -> Array:
        """|W| z (float, rounded)."""
        op = self.abs_op
        if isinstance(op, Dense):
            return np.asarray(z @ op.weight.T)
        out = op.apply_linear(z.reshape(-1, z.shape[-1]))
        return out.reshape(*z.shape[:-1], -1)

    def transpose(self, y: Array) -> Array:
        """W^T y for y of shape (..., out) -> (..., in) (float, rounded)."""
        op = self.op
        assert isinstance(op, Dense | Conv2d)
        if isinstance(op, Dense):
            return np.asarray(y @ op.weight)
        out = op.apply_transpose(y.reshape(-1, y.shape[-1]))
        return out.reshape(*y.shape[:-1], -1)


@dataclass(frozen=True, eq=False)
class Graph:
    nodes: tuple[Node, ...]

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def input_size(self) -> int:
        return self.nodes[0].size

    @property
    def output_size(self) -> int:
        return self.nodes[-1].size

    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for nd in self.nodes:
            for p in nd.parents:
                out[p].append(nd.index)
        return tuple(tuple(c) for c in out)

    def act_nodes(self) -> list[Node]:
        return [nd for nd in self.nodes if nd.kind == "act"]


def build_graph(net: Network) -> Graph:
    """The DAG of ``net`` (see the module docstring); the last node is the output."""
    nodes: list[Node] = [Node(0, "input", (), net.input_size)]

    def add(kind: NodeKind, parents: tuple[int, ...], size: int, op: object = None) -> int:
        nodes.append(Node(len(nodes), kind, parents, size, op))  # type: ignore[arg-type]
        return len(nodes) - 1

    def walk(ops: tuple[Op, ...], cur: int) -> int:
        for op in ops:
            if isinstance(op, Dense | Conv2d):
                cur = add("affine", (cur,), op.out_features, op)
            elif isinstance(op, Activation):
                cur = add("act", (cur,), nodes[cur].size, op)
            elif isinstance(op, Residual):
                b = walk(op.body, cur)
                s = walk(op.shortcut, cur) if op.shortcut else cur
                cur = add("add", (b, s), nodes[b].size)
        return cur

    last = walk(net.ops, 0)
    if last == 0:  # a network with no ops: f(x) = x
        add("act", (0,), net.input_size, Activation("identity"))
    assert nodes[-1].size == net.output_size or math.prod(net.input_shape) == nodes[-1].size
    return Graph(tuple(nodes))
