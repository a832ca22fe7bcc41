"""ONNX -> :class:`~sdp.ir.Network`, for untrusted files.

Steps: parse the protobuf (``onnx.load_model_from_string``); refuse external data, custom
domains, model-local functions, subgraphs (If/Loop/Scan), sparse initializers and oversized
tensors; run ``onnx.checker``; then walk the nodes in order, converting each with the registry
in :mod:`sdp.importers._ops` (an op off the list raises ``UnsupportedOp`` naming the node).
Declared shapes (graph output, value_info) are compared with the shapes the conversion
computes, so a file whose dims lie is refused with ``shape-mismatch``.

Batch dimension: a leading input dim of 1 (or symbolic) on an input of rank >= 2 is the
batch; ``Network.input_shape`` is the rest, e.g. [1, 784, 1] -> (784, 1), [5] -> (5,).

Layout: a Transpose applied directly to the raw input (e.g. NHWC -> NCHW before a Conv) is
absorbed into the input: ``input_shape`` is then the *transposed* layout (C, H, W), which
:meth:`~sdp.ir.Network.forward` and the bounds use, and ``Network.input_layout``
(:class:`~sdp.ir.InputLayout`) records the file's input shape (H, W, C) and the permutation.
Inputs in the file's layout (what onnxruntime takes; what the service and ``lipcert certify``
accept) go through :meth:`~sdp.ir.Network.ir_inputs` first. The permutation is not part of
``content_hash`` (an l2 bound does not see it). Other Transposes/Reshapes only permute
indices (free).
Exporter patterns recognised: ``x * sigmoid(x)`` -> SiLU, ``Where(x > t, x, Softplus(x))``
-> softplus (torch's thresholded Softplus, within e^-t).

Attributes: each op accepts the attributes listed in :data:`sdp.importers._attrs.ATTRIBUTES`
and nothing else (``unsupported-attribute``, naming node, op and attribute). Constants keep
their ONNX dtype while they are folded (:mod:`sdp.importers._fold`: Cast and integer Div as
onnxruntime computes them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from sdp.errors import ModelRejected, UnsupportedOp
from sdp.importers._attrs import check_attributes
from sdp.importers._flow import Flow
from sdp.importers._fold import ONNX_BOOL, ONNX_FLOATS, ONNX_INTS, widen
from sdp.importers._ops import CONVERTERS, GraphState, NodeContext, Value
from sdp.importers._ops_layers import Comparison  # also registers conv/activation converters
from sdp.importers.limits import Limits
from sdp.ir import Dense, InputLayout, Network

_STANDARD_DOMAINS = ("", "ai.onnx")
_INT_TYPES: dict[int, type[np.generic]] = {**ONNX_INTS, ONNX_BOOL: np.bool_}


_HINTS = {
    "Softmax": "bounds are computed for logits: export the model without its final Softmax",
    "LogSoftmax": "bounds are computed for logits: export the model without LogSoftmax",
    "MaxPool": "max pooling is not in the IR; use AveragePool or strided convolutions",
    "Clip": "clipping (ReLU6, hardtanh) is not in the IR",
}


def supported_onnx_ops() -> list[str]:
    """The ONNX op types the converter registry handles (domain ai.onnx)."""
    return sorted(CONVERTERS)


def looks_like_onnx(data: bytes) -> bool:
    """True when the bytes parse as a ModelProto with a graph (field order aside)."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        return False
    return bool(model.ir_version) and model.HasField("graph") and len(model.graph.node) > 0


def load_onnx(data: bytes, limits: Limits, name: str = "") -> Network:
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ModelRejected(f"not a valid ONNX protobuf: {exc}", code="malformed") from exc
    if not model.HasField("graph") or not model.ir_version:
        raise ModelRejected("the ONNX model has no graph or no ir_version", code="malformed")
    _check_untrusted(model, limits)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, or C++ errors
        raise ModelRejected(f"onnx.checker rejected the model: {exc}", code="malformed") from exc
    try:  # strict shape inference: declared shapes that contradict the weights are refused
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx.shape_inference.InferenceError
        raise ModelRejected(
            f"ONNX shape inference failed (declared shapes contradict the graph): {exc}",
            code="shape-mismatch",
        ) from exc
    return _convert(model, limits, name or model.graph.name or "")


def _check_untrusted(model: Any, limits: Limits) -> None:
    g = model.graph
    if len(model.functions):
        raise ModelRejected("model-local functions are not supported", code="custom-domain")
    if len(g.sparse_initializer):
        raise ModelRejected("sparse initializers are not supported", code="unsupported-graph")
    limits.check_nodes(len(g.node))
    for t in g.initializer:
        _check_tensor_proto(t, limits)
    for i, node in enumerate(g.node):
        label = node.name or f"#{i}"
        if node.domain not in _STANDARD_DOMAINS:
            raise ModelRejected(
                f"node {label!r} uses op {node.op_type!r} from custom domain {node.domain!r}",
                code="custom-domain",
            )
        for a in node.attribute:
            if a.type in (5, 10) or a.HasField("g") or len(a.graphs):  # GRAPH, GRAPHS
                err = UnsupportedOp(
                    label,
                    node.op_type,
                    f"node {label!r}: op {node.op_type!r} "
                    "has a subgraph; control flow is not supported",
                )
                err.code = "subgraph"
                raise err
            if a.HasField("t"):
                _check_tensor_proto(a.t, limits)
            for t in a.tensors:
                _check_tensor_proto(t, limits)
            if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                raise ModelRejected(
                    f"node {label!r}: sparse tensors are not supported", code="unsupported-graph"
                )


def _check_tensor_proto(t: Any, limits: Limits) -> None:
    if t.data_location == 1 or len(t.external_data):
        raise ModelRejected(
            f"tensor {t.name!r} is stored outside the file (external data); "
            "re-export with all tensors embedded",
            code="external-data",
        )
    limits.check_tensor(t.name, t.dims)
    dtype = ONNX_FLOATS.get(t.data_type) or _INT_TYPES.get(t.data_type)
    if dtype is None:
        raise ModelRejected(
            f"tensor {t.name!r} has unsupported data type {t.data_type}", code="unsupported-dtype"
        )
    n = int(np.prod([int(d) for d in t.dims], dtype=np.int64))
    if t.raw_data:
        stored = len(t.raw_data) // np.dtype(dtype).itemsize
        ok = len(t.raw_data) == n * np.dtype(dtype).itemsize
    else:
        stored = len(t.float_data) + len(t.double_data) + len(t.int32_data) + len(t.int64_data)
        stored += len(t.uint64_data)
        ok = stored == n
    if not ok:
        raise ModelRejected(
            f"tensor {t.name!r} declares {n} elements but stores {stored}", code="shape-mismatch"
        )


def _to_array(t: Any) -> np.ndarray:
    """TensorProto -> numpy in its ONNX dtype (dtype and stored size were checked by
    _check_tensor_proto); float tensors must be finite."""
    from onnx import numpy_helper

    try:
        arr = numpy_helper.to_array(t)
    except Exception as exc:
        raise ModelRejected(f"tensor {t.name!r} is unreadable: {exc}", code="malformed") from exc
    if t.data_type in ONNX_FLOATS and not np.all(np.isfinite(arr)):
        raise ModelRejected(f"tensor {t.name!r} has NaN or inf entries", code="non-finite")
    return np.asarray(arr)


def _declared_shape(vi: Any) -> list[int | None]:
    """Declared dims of a ValueInfo; None for a symbolic or unknown dim."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]


def _convert(model: Any, limits: Limits, name: str) -> Network:
    import onnx

    g = model.graph
    values: dict[str, Value] = {t.name: _to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in values]
    for vi in g.input:  # old IR versions also list the initializers as inputs
        if vi.name in values:
            _check_declared(vi.name, values[vi.name], _declared_shape(vi))
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelRejected(
            f"the graph has {len(inputs)} inputs and {len(g.output)} outputs; exactly one "
            "of each is supported",
            code="unsupported-graph",
        )
    dims = _declared_shape(inputs[0])
    if not dims:
        raise ModelRejected("the network input has no declared shape", code="unsupported-graph")
    if dims[0] is None:
        dims[0] = 1
    if any(d is None or d <= 0 for d in dims):
        raise ModelRejected(f"the input shape {dims} is not static", code="unsupported-graph")
    full = tuple(int(d) for d in dims if d is not None)
    file_shape = full[1:] if len(full) >= 2 and full[0] == 1 else full
    limits.check_width(int(np.prod(full)), "the network input")
    start = Flow.start(full)
    uses = Counter(n for node in g.node for n in node.input)
    opset = max((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), default=1)
    state = GraphState(
        start,
        uses[inputs[0].name],
        file_shape,
        opset=int(opset),
    )
    values[inputs[0].name] = start
    declared = {vi.name: _declared_shape(vi) for vi in g.value_info}
    for i, node in enumerate(g.node):
        label = node.name or f"#{i}"
        fn = CONVERTERS.get(node.op_type)
        if fn is None:
            hint = _HINTS.get(node.op_type)
            raise UnsupportedOp(
                label,
                node.op_type,
                f"node {label!r}: op {node.op_type!r} is not supported"
                + (f"; {hint}" if hint else ""),
            )
        missing = [n for n in node.input if n and n not in values]
        if missing:
            raise ModelRejected(
                f"node {label!r} reads undefined values {missing}", code="malformed"
            )
        check_attributes(label, node.op_type, (a.name for a in node.attribute))
        attrs = {}
        for a in node.attribute:
            v = onnx.helper.get_attribute_value(a)
            attrs[a.name] = _to_array(v) if a.type == 4 else v  # TENSOR
        outs = [n for n in node.output if n]
        ins = [values[n] if n else None for n in node.input]
        if any(isinstance(v, Flow) for v in ins):  # weights as float64, shapes/axes as int64
            ins = [widen(f"node {label!r}", v) if isinstance(v, np.ndarray) else v for v in ins]
        ctx = NodeContext(
            label,
            node.op_type,
            ins,
            attrs,
            limits,
            state,
            num_outputs=len(outs),
        )
        try:
            result = fn(ctx)
        except ModelRejected:
            raise
        except ValueError as exc:
            raise ModelRejected(
                f"node {label!r} ({node.op_type}): {exc}", code="shape-mismatch"
            ) from exc
        except (IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
            raise ModelRejected(
                f"node {label!r} ({node.op_type}): {exc}", code="malformed"
            ) from exc
        if len(outs) != 1:
            raise ctx.reject(f"{len(outs)} outputs; exactly one is supported")
        if isinstance(result, Comparison):
            values[outs[0]] = result
            continue
        values[outs[0]] = result if isinstance(result, Flow) else np.asarray(result)
        _check_declared(outs[0], values[outs[0]], declared.get(outs[0]))
    out = values.get(g.output[0].name)
    if not isinstance(out, Flow):
        raise ModelRejected(
            "the graph output does not depend on its input", code="unsupported-graph"
        )
    _check_declared(g.output[0].name, out, _declared_shape(g.output[0]))
    out = out.materialised(limits)
    ops = out.ops
    if not out.identity_layout:  # a trailing Transpose: permute the outputs explicitly
        perm = np.zeros((out.size, out.size))
        perm[np.arange(out.size), out.index.ravel()] = 1.0
        ops = (*ops, Dense(perm, np.zeros(out.size)))
    try:
        layout = None if state.input_perm is None else InputLayout(file_shape, state.input_perm)
        net = Network(state.input_shape, ops, name=name, input_layout=layout)
    except ValueError as exc:
        raise ModelRejected(f"inconsistent network: {exc}", code="shape-mismatch") from exc
    limits.check_network(net)
    return net


def _check_declared(name: str, value: Value, dims: list[int | None] | None) -> None:
    """A declared static shape must equal the computed one (batch dims may be symbolic)."""
    if not dims or value is None:
        return
    shape = value.shape
    if len(dims) != len(shape) or any(
        d is not None and d != s for d, s in zip(dims, shape, strict=False)
    ):
        raise ModelRejected(
            f"value {name!r} is declared with shape {dims} but computes to {list(shape)}",
            code="shape-mismatch",
        )
