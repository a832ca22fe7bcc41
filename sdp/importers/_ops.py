"""ONNX op converters: a registry of small functions, one per op (or family of ops).

Each converter receives a :class:`NodeContext` (inputs already converted: a numpy array for
a constant, a :class:`~sdp.importers._flow.Flow` for anything computed from the network
input, ``None`` for an omitted optional input) and returns the node's output values.
Constant-only nodes are folded with numpy in the constants' ONNX dtypes (see
:mod:`sdp.importers._fold`); a node that also reads the network input gets its constants as
float64/int64. An op missing from :data:`CONVERTERS` makes the importer raise
:class:`~sdp.errors.UnsupportedOp` naming the node; every registered op has its accepted
attributes in :data:`sdp.importers._attrs.ATTRIBUTES`, and any other attribute is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdp.errors import ModelRejected, UnsupportedOp
from sdp.importers._attrs import ATTRIBUTES
from sdp.importers._flow import Flow, check_matrix, fuse_silu, merge_residual
from sdp.importers._fold import cast, int_divide
from sdp.importers.limits import Limits

Value = Flow | np.ndarray | None


@dataclass
class GraphState:
    """Per-graph facts a converter may need (the raw input, for a layout Transpose)."""

    raw_input: Flow
    input_consumers: int
    input_shape: tuple[int, ...]
    opset: int = 13  # of the default ONNX domain
    #: axis permutation of the file's input shape (batch dim dropped) that gives input_shape,
    #: set when a Transpose of the raw input is absorbed (None: the file's own layout)
    input_perm: tuple[int, ...] | None = None


@dataclass
class NodeContext:
    name: str
    op: str
    inputs: list[Value]
    attrs: dict[str, Any]
    limits: Limits
    state: GraphState
    num_outputs: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def reject(self, detail: str, code: str = "unsupported-attribute") -> ModelRejected:
        return ModelRejected(f"node {self.name!r} ({self.op}): {detail}", code=code)

    def flow(self, i: int) -> Flow:
        v = self.inputs[i] if i < len(self.inputs) else None
        if not isinstance(v, Flow):
            raise self.reject(f"input {i} must depend on the network input", "unsupported-graph")
        return v

    def const(self, i: int) -> np.ndarray:
        v = self.inputs[i] if i < len(self.inputs) else None
        if not isinstance(v, np.ndarray):
            raise self.reject(
                f"input {i} must be a constant (weights cannot be computed)", "unsupported-graph"
            )
        return v

    def optional_const(self, i: int) -> np.ndarray | None:
        """A constant optional input, or None when it is omitted."""
        if i >= len(self.inputs) or self.inputs[i] is None:
            return None
        return self.const(i)


Converter = Callable[[NodeContext], Value]
CONVERTERS: dict[str, Converter] = {}


def converter(*ops: str) -> Callable[[Converter], Converter]:
    """Register ``fn`` for ``ops``; each op must list its accepted attributes in ATTRIBUTES."""

    def register(fn: Converter) -> Converter:
        for op in ops:
            if op not in ATTRIBUTES:
                raise RuntimeError(f"converter for {op} registered without its attribute list")
            CONVERTERS[op] = fn
        return fn

    return register


def _all_const(ctx: NodeContext) -> bool:
    return all(not isinstance(v, Flow) for v in ctx.inputs)


def _check_fold(ctx: NodeContext, shape: tuple[int, ...]) -> None:
    """Constant folding must not allocate more than one stored tensor may hold."""
    ctx.limits.check_tensor(f"{ctx.name} (folded)", shape)


def _matmul_shape(ctx: NodeContext, a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ctx.reject(f"cannot fold a product of {a.shape} and {b.shape}", "unsupported-graph")
    return int(a.shape[0]), int(b.shape[1])


# ---- layout and plumbing ---------------------------------------------------------------
@converter("Identity", "Dropout")
def identity(ctx: NodeContext) -> Value:
    if ctx.num_outputs > 1:
        raise ctx.reject("training-mode outputs (Dropout mask) are not supported")
    if ctx.op == "Dropout":
        _check_inference_dropout(ctx)
    return ctx.inputs[0]


def _check_inference_dropout(ctx: NodeContext) -> None:
    """Dropout is the identity only in inference mode: ``is_test=1`` (opset < 7, where the
    default 0 means training), no ``training_mode`` input or a constant false one (opset 12+)."""
    is_test = ctx.attr("is_test")
    if is_test is not None and int(is_test) != 1:
        raise ctx.reject(f"attribute 'is_test'={is_test} (training-mode dropout)")
    if is_test is None and ctx.state.opset < 7:
        raise ctx.reject("opset < 7 Dropout without is_test=1 is training-mode dropout")
    if len(ctx.inputs) > 2 and ctx.inputs[2] is not None:
        training = ctx.inputs[2]
        if not isinstance(training, np.ndarray):
            raise ctx.reject("input 'training_mode' must be a constant", "unsupported-graph")
        if np.any(training):
            raise ctx.reject("input 'training_mode' is true (training-mode dropout)")


# ONNX stores value_float(s) as float32
_CONSTANT_DTYPES = {"value_float": np.float32, "value_floats": np.float32}


@converter("Constant")
def constant(ctx: NodeContext) -> Value:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in ctx.attrs:
            return np.asarray(ctx.attrs[key], dtype=_CONSTANT_DTYPES.get(key))
    raise ctx.reject("only dense tensor, float and int constants are supported")


@converter("Flatten")
def flatten(ctx: NodeContext) -> Value:
    x = ctx.inputs[0]
    shape = _shape_of(ctx, x)
    axis = int(ctx.attr("axis", 1))
    if not -len(shape) <= axis <= len(shape):
        raise ctx.reject(f"axis {axis} is out of range for rank {len(shape)}", "malformed")
    axis = axis + len(shape) if axis < 0 else axis
    new = (math.prod(shape[:axis]), math.prod(shape[axis:]))
    return _reshape(ctx, x, new)


@converter("Reshape")
def reshape(ctx: NodeContext) -> Value:
    x = ctx.inputs[0]
    shape = _shape_of(ctx, x)
    target = [int(d) for d in np.asarray(ctx.const(1)).ravel()]
    allow_zero = int(ctx.attr("allowzero", 0))
    out = [
        shape[i] if d == 0 and not allow_zero and i < len(shape) else d
        for i, d in enumerate(target)
    ]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        raise ctx.reject(f"invalid target shape {target}", "malformed")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or math.prod(shape) % known:
            raise ctx.reject(f"cannot reshape {shape} to {target}", "shape-mismatch")
        out[out.index(-1)] = math.prod(shape) // known
    return _reshape(ctx, x, tuple(out))


@converter("Squeeze", "Unsqueeze")
def squeeze(ctx: NodeContext) -> Value:
    x = ctx.inputs[0]
    shape = list(_shape_of(ctx, x))
    axes_in = ctx.optional_const(1)
    axes = [int(a) for a in (axes_in.ravel() if axes_in is not None else ctx.attr("axes", []))]
    if ctx.op == "Squeeze":
        nd = len(shape)
        drop = {a + nd if a < 0 else a for a in axes} or {i for i, d in enumerate(shape) if d == 1}
        new = [d for i, d in enumerate(shape) if i not in drop]
    else:
        nd = len(shape) + len(axes)
        new = shape
        for a in sorted(a + nd if a < 0 else a for a in axes):
            new.insert(a, 1)
    return _reshape(ctx, x, tuple(new))


@converter("Transpose")
def transpose(ctx: NodeContext) -> Value:
    x = ctx.inputs[0]
    shape = _shape_of(ctx, x)
    perm = tuple(int(p) for p in ctx.attr("perm", list(reversed(range(len(shape))))))
    if sorted(perm) != list(range(len(shape))):
        raise ctx.reject(f"invalid perm {perm} for shape {shape}", "malformed")
    if isinstance(x, np.ndarray):
        return x.transpose(perm)
    assert isinstance(x, Flow)
    st = ctx.state
    if x is st.raw_input and st.input_consumers == 1 and (len(shape) < 2 or perm[0] == 0):
        # a Transpose of the raw input: the IR input takes the transposed layout, and the
        # network records the permutation (sdp.ir.InputLayout) so callers keep the file's
        batched = len(shape) >= 2 and shape[0] == 1  # perm[0] == 0: the batch dim stays first
        new = tuple(shape[p] for p in perm)
        st.input_shape = new[1:] if batched else new
        st.input_perm = tuple(p - 1 for p in perm[1:]) if batched else perm
        return Flow.start(new)
    return x.transpose(perm)


@converter("Shape")
def shape_op(ctx: NodeContext) -> Value:
    """``shape[start:end]``; negative ends count from the back, both clamped to [0, rank]."""
    shape = _shape_of(ctx, ctx.inputs[0])
    rank = len(shape)

    def clamp(i: int) -> int:
        return min(max(i + rank if i < 0 else i, 0), rank)

    end = ctx.attr("end")
    start, stop = clamp(int(ctx.attr("start", 0))), rank if end is None else clamp(int(end))
    return np.asarray(shape[start:stop], dtype=np.int64)


@converter("Gather", "Concat", "Cast")
def const_only(ctx: NodeContext) -> Value:
    if not _all_const(ctx):
        raise UnsupportedOp(
            ctx.name,
            ctx.op,
            f"node {ctx.name!r}: {ctx.op} of activations is not supported (only of constants)",
        )
    xs = [ctx.const(i) for i in range(len(ctx.inputs))]
    if ctx.op == "Gather":
        axis = int(ctx.attr("axis", 0))
        axis = axis + xs[0].ndim if axis < 0 else axis
        _check_fold(ctx, (*xs[0].shape[:axis], *xs[1].shape, *xs[0].shape[axis + 1 :]))
        return np.take(xs[0], xs[1].astype(np.int64), axis=axis)
    if ctx.op == "Concat":
        return np.concatenate(xs, axis=int(ctx.attr("axis")))
    return cast(f"node {ctx.name!r} (Cast)", xs[0], int(ctx.attr("to")))


# ---- elementwise arithmetic --------------------------------------------------------------
_NUMPY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


@converter("Add", "Sub", "Mul", "Div")
def arithmetic(ctx: NodeContext) -> Value:
    a, b = ctx.inputs[0], ctx.inputs[1]
    op = ctx.op
    if isinstance(a, Flow) and isinstance(b, Flow):
        if op in ("Add", "Sub"):
            return merge_residual(a, b, ctx.limits, sign=1.0 if op == "Add" else -1.0)
        fused = fuse_silu(a, b, ctx.limits) if op == "Mul" else None
        if fused is not None:
            return fused
        raise ctx.reject(f"{op} of two activations is not a linear map", "unsupported-graph")
    if not isinstance(a, Flow) and not isinstance(b, Flow):
        if not _broadcastable(ctx.const(0).shape, ctx.const(1).shape):
            raise ctx.reject("constants do not broadcast", "shape-mismatch")
        _check_fold(ctx, np.broadcast_shapes(ctx.const(0).shape, ctx.const(1).shape))
        ca, cb = ctx.const(0), ctx.const(1)
        if op == "Div" and ca.dtype.kind in "iu":  # ONNX integer Div truncates toward zero
            return int_divide(f"node {ctx.name!r} (Div)", ca, cb)
        with np.errstate(all="ignore"):  # same dtype: ints wrap, float16/32 round as in ORT
            return np.asarray(_NUMPY[op](ca, cb))
    flow, c, flow_first = (
        (a, ctx.const(1), True) if isinstance(a, Flow) else (b, ctx.const(0), False)
    )
    assert isinstance(flow, Flow) and c is not None
    c = c.astype(np.float64)
    out = np.broadcast_shapes(flow.shape, c.shape) if _broadcastable(flow.shape, c.shape) else None
    if out is None or math.prod(out) != flow.size:
        raise ctx.reject(
            f"constant {c.shape} does not broadcast to activation {flow.shape}", "shape-mismatch"
        )
    flow = flow.reshape(out)
    if op == "Add":
        return flow.affine(add=c)
    if op == "Sub":
        return flow.affine(add=-c) if flow_first else flow.affine(mul=-1.0, add=c)
    if op == "Mul":
        return flow.affine(mul=c)
    if not flow_first:
        raise ctx.reject("division by an activation is not a linear map", "unsupported-graph")
    if np.any(c == 0):
        raise ctx.reject("division by zero", "non-finite")
    return flow.affine(mul=1.0 / c)


def _broadcastable(s1: tuple[int, ...], s2: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(s1, s2)
    except ValueError:
        return False
    return True


# ---- affine layers -------------------------------------------------------------------------
@converter("Gemm")
def gemm(ctx: NodeContext) -> Value:
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    c = ctx.optional_const(2)
    if _all_const(ctx):
        ca, cb = ctx.const(0), ctx.const(1)
        if ca.dtype.kind != "f":
            raise ctx.reject(
                f"folding a {ca.dtype.name} Gemm is not supported", "unsupported-graph"
            )
        ca, cb = (ca.T if ta else ca), (cb.T if tb else cb)
        _check_fold(ctx, _matmul_shape(ctx, ca, cb))
        y = alpha * ca @ cb
        return np.asarray(y + beta * c if c is not None else y, dtype=ca.dtype)
    a, b = ctx.inputs[0], ctx.inputs[1]
    if isinstance(a, Flow) and isinstance(b, np.ndarray):
        x = a.transpose((1, 0)) if ta else a
        w = b.T if tb else b  # (K, N)
        if len(x.shape) != 2 or x.shape[1] != w.shape[0]:
            raise ctx.reject(f"input {x.shape} does not match weight {w.shape}", "shape-mismatch")
        m, n = x.shape[0], w.shape[1]
        check_matrix(ctx.limits, m * n, x.size)
        lin = alpha * np.kron(np.eye(m), w.T) if m > 1 else alpha * w.T
    elif isinstance(b, Flow) and isinstance(a, np.ndarray):
        x = b.transpose((1, 0)) if tb else b
        w = a.T if ta else a  # (M, K)
        if len(x.shape) != 2 or x.shape[0] != w.shape[1]:
            raise ctx.reject(f"weight {w.shape} does not match input {x.shape}", "shape-mismatch")
        m, n = w.shape[0], x.shape[1]
        check_matrix(ctx.limits, m * n, x.size)
        lin = alpha * np.kron(w, np.eye(n))
    else:
        raise ctx.reject("Gemm of two activations is not a linear map", "unsupported-graph")
    bias = np.zeros((m, n))
    if c is not None:
        if not _broadcastable(c.shape, (m, n)) or np.broadcast_shapes(c.shape, (m, n)) != (m, n):
            raise ctx.reject(f"bias {c.shape} does not broadcast to {(m, n)}", "shape-mismatch")
        bias = bias + beta * c
    return x.then_dense(lin, bias.ravel(), (m, n), ctx.limits)


@converter("MatMul")
def matmul(ctx: NodeContext) -> Value:
    if _all_const(ctx):
        _check_fold(ctx, _matmul_shape(ctx, ctx.const(0), ctx.const(1)))
        return np.matmul(ctx.const(0), ctx.const(1))
    a, b = ctx.inputs[0], ctx.inputs[1]
    if isinstance(a, Flow) and isinstance(b, Flow):
        raise ctx.reject("MatMul of two activations is not a linear map", "unsupported-graph")
    x = a if isinstance(a, Flow) else b
    w = ctx.const(1) if isinstance(a, Flow) else ctx.const(0)
    assert isinstance(x, Flow) and w is not None
    if w.ndim > 2 and all(d == 1 for d in w.shape[:-2]):
        w_full, w = w, w.reshape(w.shape[-2:])
    else:
        w_full = w
    if w.ndim != 2:
        raise ctx.reject(f"weight of shape {w.shape} is not a matrix", "unsupported-graph")
    s = x.shape
    try:
        probe = (np.zeros(s), w_full) if x is a else (w_full, np.zeros(s))
        out_shape = tuple(np.matmul(*probe).shape)
    except ValueError as exc:
        raise ctx.reject(f"{s} and {w.shape} do not multiply: {exc}", "shape-mismatch") from exc
    if x is a:  # x @ W, rows of length K
        r = x.size // w.shape[0]
        check_matrix(ctx.limits, r * w.shape[1], x.size)
        lin = w.T if r == 1 else np.kron(np.eye(r), w.T)
    else:  # W @ x
        if len(s) == 1:
            lin = w
        else:
            n, batch = s[-1], math.prod(s[:-2])
            check_matrix(ctx.limits, batch * w.shape[0] * n, x.size)
            lin = np.kron(np.eye(batch), np.kron(w, np.eye(n)))
    if lin.shape[0] != math.prod(out_shape):
        raise ctx.reject(f"cannot map {s} @ {w_full.shape}", "unsupported-graph")
    return x.then_dense(lin, np.zeros(lin.shape[0]), out_shape, ctx.limits)


def _shape_of(ctx: NodeContext, x: Value) -> tuple[int, ...]:
    if x is None:
        raise ctx.reject("missing input", "malformed")
    return tuple(int(d) for d in x.shape)


def _reshape(ctx: NodeContext, x: Value, new: tuple[int, ...]) -> Value:
    size = math.prod(_shape_of(ctx, x))
    if math.prod(new) != size or any(d < 0 for d in new):
        raise ctx.reject(f"cannot reshape {_shape_of(ctx, x)} to {new}", "shape-mismatch")
    if isinstance(x, np.ndarray):
        return x.reshape(new)
    assert isinstance(x, Flow)
    return x.reshape(new)
