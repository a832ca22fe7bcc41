"""The symbolic value that ONNX conversion pushes through a graph.

A :class:`Flow` is a tensor that depends on the network input. It holds

* ``ops``: the IR ops applied so far (from the network input), as a tuple shared with
  the flows it came from, so two branches that meet in an ``Add`` find their common prefix;
* ``index``: an int array with the tensor's ONNX shape (batch dim included, = 1):
  ``index.flat[k]`` is the position in the IR's flat vector of ONNX element ``k``. Reshape and
  Flatten reshape it, Transpose permutes it; the IR itself never moves data;
* ``scale``/``shift`` (ONNX shape, or None): a pending elementwise map
  ``value = z[index] * scale + shift`` from Add/Sub/Mul/Div by constants and BatchNorm, folded
  into the next affine layer (input normalisation) or the previous one (bias adds), so it
  costs no extra layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sdp.errors import ModelRejected
from sdp.importers.limits import Limits
from sdp.ir import Activation, Conv2d, Dense, Op, Residual

IntArray = np.ndarray


@dataclass(frozen=True, eq=False)
class Flow:
    ops: tuple[Op, ...]
    index: IntArray
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    @staticmethod
    def start(shape: tuple[int, ...]) -> Flow:
        return Flow((), np.arange(int(np.prod(shape))).reshape(shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.index.shape)

    @property
    def size(self) -> int:
        return int(self.index.size)

    @property
    def has_pending(self) -> bool:
        return self.scale is not None or self.shift is not None

    @property
    def identity_layout(self) -> bool:
        return bool(np.array_equal(self.index.ravel(), np.arange(self.size)))

    # ---- layout ----------------------------------------------------------------------
    def reshape(self, shape: tuple[int, ...]) -> Flow:
        return Flow(
            self.ops,
            self.index.reshape(shape),
            None if self.scale is None else self.scale.reshape(shape),
            None if self.shift is None else self.shift.reshape(shape),
        )

    def transpose(self, perm: tuple[int, ...]) -> Flow:
        return Flow(
            self.ops,
            self.index.transpose(perm),
            None if self.scale is None else self.scale.transpose(perm),
            None if self.shift is None else self.shift.transpose(perm),
        )

    # ---- pending elementwise affine ---------------------------------------------------
    def affine(self, mul: np.ndarray | float = 1.0, add: np.ndarray | float = 0.0) -> Flow:
        """``value * mul + add`` with constants that broadcast to (not beyond) the flow shape."""
        for c in (mul, add):
            c = np.asarray(c)
            try:
                out = np.broadcast_shapes(self.shape, c.shape)
            except ValueError:
                out = None
            if out != self.shape:
                raise ModelRejected(
                    f"a constant of shape {c.shape} does not broadcast to the activation "
                    f"shape {self.shape}",
                    code="shape-mismatch",
                )
        s = np.ones(self.shape) if self.scale is None else self.scale
        t = np.zeros(self.shape) if self.shift is None else self.shift
        s = np.broadcast_to(s * mul, self.shape).astype(np.float64)
        t = np.broadcast_to(t * mul + add, self.shape).astype(np.float64)
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
            raise ModelRejected("constant arithmetic produced inf/NaN", code="non-finite")
        return Flow(self.ops, self.index, s, t)

    def pending_ir(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) as flat vectors in IR order."""
        s, t = np.ones(self.size), np.zeros(self.size)
        if self.scale is not None:
            s[self.index.ravel()] = self.scale.ravel()
        if self.shift is not None:
            t[self.index.ravel()] = self.shift.ravel()
        return s, t

    def materialised(self, limits: Limits) -> Flow:
        """The same value with the pending map turned into ops (folded where exact)."""
        if not self.has_pending:
            return self
        s, t = self.pending_ir()
        base = Flow(self.ops, self.index)
        if np.all(s == 1.0) and np.all(t == 0.0):
            return base
        last = self.ops[-1] if self.ops else None
        if isinstance(last, Dense):
            folded: Op = Dense(s[:, None] * last.weight, s * last.bias + t)
            return Flow((*self.ops[:-1], folded), self.index)
        if isinstance(last, Conv2d):
            per = _per_channel(s, t, last.out_shape)
            if per is not None:
                sc, tc = per
                w = last.weight * sc[:, None, None, None]
                return Flow(
                    (*self.ops[:-1], replace(last, weight=w, bias=sc * last.bias + tc)), self.index
                )
        image = _image_shape(self)
        if image is not None:
            per = _per_channel(s, t, image)
            if per is not None:
                sc, tc = per
                dw = Conv2d(sc.reshape(-1, 1, 1, 1), tc, image, groups=image[0])
                return Flow((*self.ops, dw), self.index)
        limits.check_width(self.size, "an elementwise scaling")
        check_matrix(limits, self.size, self.size)
        return Flow((*self.ops, Dense(np.diag(s), t)), self.index)

    # ---- layers ------------------------------------------------------------------------
    def then_dense(
        self, weight: np.ndarray, bias: np.ndarray, out_shape: tuple[int, ...], limits: Limits
    ) -> Flow:
        """``y = weight @ value.ravel() + bias`` where ``value`` is this flow in ONNX layout."""
        n_out = int(weight.shape[0])
        limits.check_width(n_out, "a dense layer")
        check_matrix(limits, n_out, self.size)
        w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        if self.shift is not None:  # W (s * x + t) + b = (W s) x + (W t + b)
            b = b + w.dot(self.shift.ravel())
        if self.scale is not None:
            w = w * self.scale.ravel()[None, :]
        w_ir = np.empty_like(w)
        w_ir[:, self.index.ravel()] = w
        dense = Dense(w_ir, b)
        return Flow((*self.ops, dense), np.arange(n_out).reshape(out_shape))

    def then_conv(self, conv: Conv2d, out_shape: tuple[int, ...], limits: Limits) -> Flow:
        """Append a convolution; folds a per-channel pending map into it when exact."""
        limits.check_width(conv.out_features, "a convolution")
        flow = self
        if flow.has_pending:
            s, t = flow.pending_ir()
            per = _per_channel(s, t, conv.in_shape)
            no_pad = not any(conv.padding)
            if per is not None and (no_pad or not np.any(per[1])):
                sc, tc = per
                w = conv.weight
                g = conv.groups
                co, cig = w.shape[0], w.shape[1]
                sc_g = sc.reshape(g, 1, cig)  # input channel c = g*cig + j
                tc_g = tc.reshape(g, 1, cig)
                wg = w.reshape(g, co // g, cig, *w.shape[2:])
                bias = conv.bias + np.einsum("gocij,gxc->go", wg, tc_g).reshape(co)
                w = (wg * sc_g[..., None, None]).reshape(w.shape)
                conv = replace(conv, weight=w, bias=bias)
                flow = Flow(flow.ops, flow.index)
            else:
                flow = flow.materialised(limits)
        if not flow.identity_layout:
            raise ModelRejected(
                "a convolution reads a transposed tensor; only a Transpose of the raw input "
                "layout is supported before convolutions",
                code="unsupported-graph",
            )
        return Flow((*flow.ops, conv), np.arange(conv.out_features).reshape(out_shape))

    def then_activation(self, act: Activation, limits: Limits) -> Flow:
        flow = self.materialised(limits)
        return Flow((*flow.ops, act), flow.index)


def merge_residual(a: Flow, b: Flow, limits: Limits, sign: float = 1.0) -> Flow:
    """``a + sign * b`` for two flows: a :class:`Residual` over their common prefix."""
    if a.shape != b.shape:
        raise ModelRejected(
            f"residual branches have different shapes {a.shape} and {b.shape}",
            code="shape-mismatch",
        )
    if sign != 1.0:
        b = b.affine(sign)
    a, b = a.materialised(limits), b.materialised(limits)
    if not np.array_equal(a.index, b.index):
        raise ModelRejected(
            "residual branches use different memory layouts", code="unsupported-graph"
        )
    k = 0
    while k < min(len(a.ops), len(b.ops)) and a.ops[k] is b.ops[k]:
        k += 1
    res = Residual(a.ops[k:], b.ops[k:])
    return Flow((*a.ops[:k], res), a.index)


def same_value(a: Flow, b: Flow, limits: Limits) -> bool:
    """True when two flows provably hold the same tensor (same ops up to equal copies)."""
    if a is b:
        return True
    if a.shape != b.shape or not np.array_equal(a.index, b.index):
        return False
    ma, mb = a.materialised(limits), b.materialised(limits)
    return len(ma.ops) == len(mb.ops) and all(
        _same_op(x, y) for x, y in zip(ma.ops, mb.ops, strict=True)
    )


def _same_op(x: Op, y: Op) -> bool:
    if x is y:
        return True
    if isinstance(x, Dense) and isinstance(y, Dense):
        return np.array_equal(x.weight, y.weight) and np.array_equal(x.bias, y.bias)
    if isinstance(x, Conv2d) and isinstance(y, Conv2d):
        meta = ("in_shape", "stride", "padding", "dilation", "groups")
        return all(getattr(x, k) == getattr(y, k) for k in meta) and _same_op(
            Dense(x.weight.reshape(x.weight.shape[0], -1), x.bias),
            Dense(y.weight.reshape(y.weight.shape[0], -1), y.bias),
        )
    if isinstance(x, Activation) and isinstance(y, Activation):
        return x == y
    return False


def activation_input(flow: Flow, name: str) -> Flow | None:
    """If ``flow`` is ``name(g)`` with nothing pending, the flow ``g`` (materialised)."""
    last = flow.ops[-1] if flow.ops else None
    if flow.has_pending or not isinstance(last, Activation) or last.name != name:
        return None
    return Flow(flow.ops[:-1], flow.index)


def fuse_silu(a: Flow, b: Flow, limits: Limits) -> Flow | None:
    """``x * sigmoid(x)`` (how exporters write SiLU) as one SiLU activation, else None."""
    for x, gate in ((a, b), (b, a)):
        inner = activation_input(gate, "sigmoid")
        if inner is not None and same_value(x, inner, limits):
            return Flow((*inner.ops, Activation("silu")), inner.index)
    return None


def check_matrix(limits: Limits, rows: int, cols: int) -> None:
    if rows * cols > limits.max_parameters:
        raise ModelRejected(
            f"a {rows} x {cols} matrix exceeds the parameter limit {limits.max_parameters}",
            code="too-many-parameters",
        )


def _per_channel(
    s: np.ndarray, t: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    c = shape[0]
    if s.size != int(np.prod(shape)):
        return None
    s2, t2 = s.reshape(c, -1), t.reshape(c, -1)
    if np.all(s2 == s2[:, :1]) and np.all(t2 == t2[:, :1]):
        return s2[:, 0].copy(), t2[:, 0].copy()
    return None


def _image_shape(flow: Flow) -> tuple[int, int, int] | None:
    """(C, H, W) when the flow is a batch-1 NCHW tensor in IR layout."""
    if len(flow.shape) == 4 and flow.shape[0] == 1 and flow.identity_layout:
        _, c, h, w = flow.shape
        return c, h, w
    return None
