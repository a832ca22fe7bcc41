"""Converters for convolution, pooling, batch norm and activations (see :mod:`._ops`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdp.errors import UnsupportedOp
from sdp.importers._flow import Flow, activation_input, same_value
from sdp.importers._ops import NodeContext, Value, converter
from sdp.ir import Activation, Conv2d


def _pads(
    ctx: NodeContext,
    hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """ONNX pads [top, left, bottom, right] from ``pads`` / ``auto_pad``."""
    auto = ctx.attr("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", ""):
        p = [int(v) for v in ctx.attr("pads", [0, 0, 0, 0])]
        if len(p) != 4 or min(p) < 0:
            raise ctx.reject(f"pads {p} are not 2-D", "unsupported-attribute")
        return p[0], p[1], p[2], p[3]
    if auto == "VALID":
        return 0, 0, 0, 0
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if dilation != (1, 1):
            # onnxruntime 1.23 refuses this for Conv and pads AveragePool as if undilated
            raise ctx.reject(
                f"attribute 'auto_pad'={auto} with dilations {list(dilation)}: onnxruntime "
                "does not compute it as the ONNX spec says; use explicit pads"
            )
        begin, end = [], []
        for size, k, s, d in zip(hw, kernel, stride, dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin[0], begin[1], end[0], end[1]
    raise ctx.reject(f"auto_pad={auto!r}", "unsupported-attribute")


def _pair(ctx: NodeContext, key: str, default: int = 1) -> tuple[int, int]:
    v = [int(x) for x in ctx.attr(key, [default, default])]
    if len(v) != 2 or min(v) < 1:
        raise ctx.reject(f"{key}={v}: only 2-D convolutions are supported")
    return v[0], v[1]


def _image(ctx: NodeContext, x: Flow) -> tuple[int, int, int]:
    if len(x.shape) != 4 or x.shape[0] != 1:
        raise ctx.reject(f"expects a batch-1 NCHW tensor, got {x.shape}", "unsupported-graph")
    return x.shape[1], x.shape[2], x.shape[3]


@converter("Conv")
def conv(ctx: NodeContext) -> Value:
    x = ctx.flow(0)
    w = ctx.const(1)
    b = ctx.optional_const(2)
    assert w is not None
    if w.ndim != 4:
        raise ctx.reject(f"weight {w.shape}: only 2-D convolutions are supported")
    c, h, wd = _image(ctx, x)
    kernel = (int(w.shape[2]), int(w.shape[3]))
    if "kernel_shape" in ctx.attrs and tuple(ctx.attrs["kernel_shape"]) != kernel:
        raise ctx.reject(
            f"kernel_shape {ctx.attrs['kernel_shape']} != weight {w.shape}", "shape-mismatch"
        )
    stride, dilation = _pair(ctx, "strides"), _pair(ctx, "dilations")
    pads = _pads(ctx, (h, wd), kernel, stride, dilation)
    layer = Conv2d(
        w,
        np.zeros(w.shape[0]) if b is None else b.ravel(),
        (c, h, wd),
        stride,
        pads,
        dilation,
        int(ctx.attr("group", 1)),
    )
    return x.then_conv(layer, (1, *layer.out_shape), ctx.limits)


@converter("AveragePool", "GlobalAveragePool")
def average_pool(ctx: NodeContext) -> Value:
    """Average pooling is linear: a depthwise convolution with kernel 1/(kh kw), dilated by
    ``dilations`` (window extent (k - 1) d + 1)."""
    x = ctx.flow(0)
    c, h, wd = _image(ctx, x)
    if ctx.op == "GlobalAveragePool":
        kernel, stride, dilation, pads = (h, wd), (1, 1), (1, 1), (0, 0, 0, 0)
    else:
        kernel = _pair(ctx, "kernel_shape")
        stride, dilation = _pair(ctx, "strides"), _pair(ctx, "dilations")
        pads = _pads(ctx, (h, wd), kernel, stride, dilation)
        if any(pads) and not int(ctx.attr("count_include_pad", 0)):
            raise ctx.reject("padding with count_include_pad=0 is not a convolution")
        if int(ctx.attr("ceil_mode", 0)):
            for size, k, s, d, lo, hi in (
                (h, kernel[0], stride[0], dilation[0], pads[0], pads[2]),
                (wd, kernel[1], stride[1], dilation[1], pads[1], pads[3]),
            ):
                if (size + lo + hi - (k - 1) * d - 1) % s:
                    raise ctx.reject("ceil_mode=1 with a partial last window")
    weight = np.full((c, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
    layer = Conv2d(weight, np.zeros(c), (c, h, wd), stride, pads, dilation, c)
    return x.then_conv(layer, (1, *layer.out_shape), ctx.limits)


@converter("BatchNormalization")
def batch_norm(ctx: NodeContext) -> Value:
    """Eval mode: y = scale (x - mean) / sqrt(var + eps) + B, a per-channel affine map."""
    if ctx.num_outputs > 1 or int(ctx.attr("training_mode", 0)):
        raise ctx.reject("training-mode BatchNormalization is not supported")
    is_test = ctx.attr("is_test")
    if (is_test is not None and int(is_test) != 1) or (is_test is None and ctx.state.opset < 7):
        raise ctx.reject("attribute 'is_test' is not 1 (training-mode BatchNormalization)")
    if int(ctx.attr("spatial", 1)) != 1:
        raise ctx.reject("attribute 'spatial'=0 (per-element statistics) is not supported")
    x = ctx.flow(0)
    scale, bias, mean, var = (np.asarray(ctx.const(i), np.float64).ravel() for i in range(1, 5))
    if len(x.shape) < 2 or not all(v.size == x.shape[1] for v in (scale, bias, mean, var)):
        raise ctx.reject(f"parameters do not match {x.shape}", "shape-mismatch")
    eps = float(ctx.attr("epsilon", 1e-5))
    if np.any(var + eps <= 0):
        raise ctx.reject("variance + epsilon must be positive", "non-finite")
    s = scale / np.sqrt(var + eps)
    t = bias - mean * s
    bshape = (1, x.shape[1]) + (1,) * (len(x.shape) - 2)
    return x.affine(mul=s.reshape(bshape), add=t.reshape(bshape))


_ACTS = {
    "Gelu": "gelu",
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Elu": "elu",
    "Softplus": "softplus",
}
_DEFAULT_PARAM = {"LeakyRelu": 0.01, "Elu": 1.0}


@converter(*_ACTS, "PRelu")
def activation(ctx: NodeContext) -> Value:
    if ctx.op == "PRelu":
        slope = np.asarray(ctx.const(1), np.float64)
        if slope.size == 0 or not np.all(slope == slope.ravel()[0]):
            raise ctx.reject("PRelu with per-channel slopes is not supported")
        act = Activation("leaky_relu", float(slope.ravel()[0]))
    elif ctx.op == "Gelu" and _text(ctx.attr("approximate", "none")) != "none":
        raise ctx.reject("the tanh approximation of GELU differs from the exact (erf) GELU")
    else:
        param = float(ctx.attr("alpha", _DEFAULT_PARAM.get(ctx.op, 0.0)))
        try:
            act = Activation(_ACTS[ctx.op], param)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ctx.reject(str(exc)) from exc
    x = ctx.inputs[0]
    if isinstance(x, np.ndarray):  # folded in float64, returned in the constant's dtype
        return np.asarray(act(x)).astype(x.dtype)
    return ctx.flow(0).then_activation(act, ctx.limits)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, eq=False)
class Comparison:
    """``flow > threshold`` (ONNX Greater with a scalar constant); only Where may consume it."""

    flow: Flow
    threshold: float


@converter("Greater")
def greater(ctx: NodeContext) -> Value:
    c = ctx.const(1)
    if c.size != 1:
        raise ctx.reject("only comparisons with a scalar are supported", "unsupported-graph")
    return Comparison(ctx.flow(0), float(c.ravel()[0]))  # type: ignore[return-value]


# above the threshold torch returns x where softplus gives x + log1p(e^-beta x)/beta:
# the two differ by less than e^-threshold / beta, accepted when below 1e-6 (t = 20: 2e-9)
_MAX_SOFTPLUS_DEVIATION = 1e-6


@converter("Where")
def where(ctx: NodeContext) -> Value:
    """torch's Softplus(beta, threshold=t) as exported:
    ``Where(beta x > t, x, Softplus(beta x) / beta)``.

    That is the IR map ``softplus(beta x) / beta`` up to ``e^-t / beta`` (accepted below 1e-6;
    torch's default t = 20 gives 2e-9); any other Where is refused.
    """
    cond = ctx.inputs[0]
    a, b = ctx.flow(1), ctx.flow(2)
    beta, plain = 1.0, b
    if b.has_pending:  # the 1/beta of Softplus(beta x) / beta
        s = np.ravel(b.scale) if b.scale is not None else np.ones(1)
        shift_free = b.shift is None or not np.any(b.shift)
        if shift_free and s.size and np.all(s == s[0]) and s[0] > 0:
            beta, plain = 1.0 / float(s[0]), Flow(b.ops, b.index)
    inner = activation_input(plain, "softplus")
    if (
        isinstance(cond, Comparison)
        and inner is not None
        and math.exp(-cond.threshold) / beta <= _MAX_SOFTPLUS_DEVIATION
        and same_value(cond.flow, inner, ctx.limits)
        and same_value(cond.flow, a if beta == 1.0 else a.affine(mul=beta), ctx.limits)
    ):
        return b
    raise UnsupportedOp(
        ctx.name,
        ctx.op,
        f"node {ctx.name!r}: Where is only supported as torch's thresholded Softplus",
    )


@converter("ReduceMean", "ReduceSum")
def reduce_linear(ctx: NodeContext) -> Value:
    """Mean/sum over axes: linear, y = R x with R[j, k] = 1/n (mean) or 1 (sum) when input
    element k lands in output element j."""
    x = ctx.flow(0)
    shape = x.shape
    axes_in = ctx.optional_const(1)
    raw = axes_in.ravel().tolist() if axes_in is not None else ctx.attr("axes", None)
    if not raw:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return x
        raw = list(range(len(shape)))
    axes = sorted({int(a) + len(shape) if int(a) < 0 else int(a) for a in raw})
    if not all(0 <= a < len(shape) for a in axes):
        raise ctx.reject(f"axes {raw} are out of range for rank {len(shape)}", "malformed")
    keep = int(ctx.attr("keepdims", 1))
    out_keep = tuple(1 if i in axes else d for i, d in enumerate(shape))
    out_shape = out_keep if keep else tuple(d for i, d in enumerate(shape) if i not in axes)
    n_out = math.prod(out_keep)
    target = np.arange(n_out).reshape(out_keep)
    rows = np.broadcast_to(target, shape).ravel()  # output element of each input element
    count = math.prod(shape[a] for a in axes)
    weight = np.zeros((n_out, x.size))
    weight[rows, np.arange(x.size)] = 1.0 / count if ctx.op == "ReduceMean" else 1.0
    return x.then_dense(weight, np.zeros(n_out), out_shape, ctx.limits)
