"""The attributes each supported ONNX op may carry: anything else is refused.

A converter that meets an attribute it does not model must not ignore it (an ignored
``dilations``, ``start`` or ``is_test`` gives an IR that computes another function than the
file). So every op in the converter registry has an entry here, listing the attributes its
converter reads; :func:`check_attributes` refuses any other one with ``unsupported-attribute``,
naming the node, the op and the attribute. Where only some values of an accepted attribute
are modelled (``auto_pad``, ``ceil_mode``, ``count_include_pad``, ``is_test``, ``spatial``,
``training_mode``, ``approximate``), the converter checks the value and refuses the rest.

Left off on purpose (refused): legacy attributes that change an op's meaning, e.g. opset-6
``broadcast``/``axis`` on Add/Sub/Mul/Div/Gemm, opset-1 ``consumed_inputs``, Constant's
``sparse_value`` and string values.

``onnx.checker`` already refuses attributes outside an op's schema; this table also refuses
the schema-valid ones that lipcert does not model.
"""

from __future__ import annotations

from collections.abc import Iterable

from sdp.errors import ModelRejected

_NONE: frozenset[str] = frozenset()
_POOL = frozenset({"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape"})

ATTRIBUTES: dict[str, frozenset[str]] = {
    # layout and plumbing
    "Identity": _NONE,
    "Dropout": frozenset({"ratio", "seed", "is_test"}),  # is_test=1 only (inference)
    "Constant": frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"}),
    "Flatten": frozenset({"axis"}),
    "Reshape": frozenset({"allowzero"}),
    "Squeeze": frozenset({"axes"}),
    "Unsqueeze": frozenset({"axes"}),
    "Transpose": frozenset({"perm"}),
    "Shape": frozenset({"start", "end"}),
    "Gather": frozenset({"axis"}),
    "Concat": frozenset({"axis"}),
    "Cast": frozenset({"to", "saturate"}),  # saturate only acts on float8 targets (refused)
    # arithmetic and affine layers
    "Add": _NONE,
    "Sub": _NONE,
    "Mul": _NONE,
    "Div": _NONE,
    "Gemm": frozenset({"alpha", "beta", "transA", "transB"}),
    "MatMul": _NONE,
    "Conv": frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}),
    "AveragePool": _POOL | {"pads", "strides"},
    "GlobalAveragePool": _NONE,
    # eval mode only: training_mode=0, is_test=1, spatial=1; momentum only acts in training
    "BatchNormalization": frozenset({"epsilon", "momentum", "training_mode", "is_test", "spatial"}),
    "ReduceMean": frozenset({"axes", "keepdims", "noop_with_empty_axes"}),
    "ReduceSum": frozenset({"axes", "keepdims", "noop_with_empty_axes"}),
    # activations and the patterns built from them
    "Relu": _NONE,
    "Sigmoid": _NONE,
    "Tanh": _NONE,
    "Softplus": _NONE,
    "PRelu": _NONE,
    "LeakyRelu": frozenset({"alpha"}),
    "Elu": frozenset({"alpha"}),
    "Gelu": frozenset({"approximate"}),  # "none" only
    "Greater": _NONE,
    "Where": _NONE,
}


def check_attributes(node: str, op: str, names: Iterable[str]) -> None:
    """Refuse any attribute of ``op`` that is not in :data:`ATTRIBUTES`."""
    allowed = ATTRIBUTES[op]
    for name in names:
        if name not in allowed:
            raise ModelRejected(
                f"node {node!r} ({op}): attribute {name!r} is not supported "
                f"(supported: {', '.join(sorted(allowed)) or 'none'})",
                code="unsupported-attribute",
            )
