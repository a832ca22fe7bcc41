"""The ONNX importer follows ONNX semantics as onnxruntime computes them, or refuses.

One group per soundness finding (F1-F5) of an earlier review of the importer:
constant Cast to every target type, AveragePool dilations, Shape start/end, integer Div,
training-mode Dropout; and the attribute allow-list that closes the class (an attribute a
converter does not model is refused, naming node, op and attribute). onnxruntime is the
oracle; nothing is mocked.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdp.errors import ModelRejected
from sdp.importers import load_model
from sdp.importers._attrs import ATTRIBUTES, check_attributes
from sdp.importers._ops import CONVERTERS
from tests.sdp.importer_cases import assert_matches_ort, init, make_model, ort_run, rng_w


def _const(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _matches_ort(data: bytes, shape: list[int], trials: int = 3) -> None:
    net = load_model(data)
    rng = np.random.default_rng(5)
    for _ in range(trials):
        assert_matches_ort(net, data, rng.uniform(-1, 1, shape))


def _refused(data: bytes, code: str, *words: str) -> ModelRejected:
    with pytest.raises(ModelRejected) as exc:
        load_model(data)
    assert exc.value.code == code, str(exc.value)
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))
    return exc.value


# ---------------------------------------------------------------- F1: Cast of constants
def _scaled_by_cast(c: np.ndarray, to: int) -> bytes:
    """y = x * Cast(Cast(c, to), FLOAT): the folded Cast is the weight."""
    return make_model(
        [
            helper.make_node("Cast", ["c"], ["t"], to=to, name="cast_to"),
            helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "f"], ["y"]),
        ],
        [_const("c", c)],
        [1, c.size],
        [1, c.size],
        opset=19,  # every cast target (float8 since 19)
    )


_INTS = np.array([-1, 255, 256, 300, -129, 128, 70000, -70000, 0, 3], np.int64)
_FLOATS = np.array([-1.7, -0.5, 0.5, 2.9, 100.25, 1 + 2**-11 + 2**-40, 7.0, 1e-8], np.float64)
T = TensorProto


@pytest.mark.parametrize(
    ("src", "to"),
    [
        *[
            ("int64", t)
            for t in (T.UINT8, T.INT8, T.UINT16, T.INT16, T.INT32, T.UINT32, T.INT64, T.BOOL)
        ],
        ("int64", T.FLOAT16),
        ("int64", T.DOUBLE),
        *[("float64", t) for t in (T.FLOAT, T.FLOAT16, T.BOOL, T.INT8, T.INT32, T.INT64)],
        *[("float32", t) for t in (T.FLOAT16, T.BOOL, T.INT16, T.DOUBLE)],
        ("float16", T.FLOAT),
        ("bool", T.FLOAT),
        ("uint8", T.INT8),
    ],
)
def test_cast_of_constants_matches_onnxruntime(src: str, to: int) -> None:
    """Wrap-around (int64 -1 -> uint8 255: the reviewer's net with Lipschitz constant 255),
    truncation toward zero, bool = (x != 0), float16 rounding through float32."""
    c = (_INTS if src.startswith(("int", "uint", "bool")) else _FLOATS).astype(src)
    if src == "int64" and to == T.FLOAT16:
        c = c[np.abs(c) < 60000]  # larger ones overflow half precision (refused below)
    data = _scaled_by_cast(c, to)
    _matches_ort(data, [1, c.size])
    if src == "int64" and to == T.UINT8:  # the weight is 255, not the -1 the file stores
        net = load_model(data)
        assert net.forward(np.eye(c.size)[0])[0] == 255.0


def test_cast_double_to_half_rounds_through_float() -> None:
    """1 + 2^-11 + 2^-40: direct double -> half rounds up, onnxruntime (via float) gives 1."""
    c = np.array([1 + 2**-11 + 2**-40], np.float64)
    data = _scaled_by_cast(c, T.FLOAT16)
    assert ort_run(data, np.ones((1, 1), np.float32)).item() == 1.0
    assert load_model(data).forward(np.ones(1)).item() == 1.0


@pytest.mark.parametrize(
    ("c", "to", "code"),
    [
        (np.array([-1.7, 2.0]), T.UINT8, "unsupported-attribute"),  # ORT: 255, platform UB
        (np.array([256.0]), T.UINT8, "unsupported-attribute"),  # ORT: 0
        (np.array([1e10]), T.INT32, "unsupported-attribute"),  # ORT: int32 min
        (np.array([1e6], np.float32), T.FLOAT16, "non-finite"),  # inf
        (np.array([1e300]), T.FLOAT, "non-finite"),  # inf
        (np.array([1.0], np.float32), T.BFLOAT16, "unsupported-attribute"),
        (np.array([1.0], np.float32), T.FLOAT8E4M3FN, "unsupported-attribute"),
    ],
)
def test_cast_without_a_defined_value_is_refused(c: np.ndarray, to: int, code: str) -> None:
    _refused(_scaled_by_cast(c, to), code, "cast_to", "Cast")


def test_folding_keeps_integer_types() -> None:
    """uint8 200 + 100 wraps to 44 in ONNX (int64 folding gave 300)."""
    data = make_model(
        [
            helper.make_node("Add", ["a", "b"], ["s"]),
            helper.make_node("Cast", ["s"], ["f"], to=T.FLOAT),
            helper.make_node("Mul", ["x", "f"], ["y"]),
        ],
        [_const("a", np.array([200, 7], np.uint8)), _const("b", np.array([100, 1], np.uint8))],
        [1, 2],
        [1, 2],
        opset=14,  # uint8 Add since 14
    )
    _matches_ort(data, [1, 2])
    np.testing.assert_array_equal(load_model(data).forward(np.ones(2)), [44.0, 8.0])


# ---------------------------------------------------------------- F2: AveragePool dilations
def _dilated_pool(**attrs: object) -> bytes:
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("AveragePool", ["r"], ["p"], name="pool", **attrs),
            helper.make_node("GlobalAveragePool", ["p"], ["g"]),  # hides the pooled shape
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1),
        ],
        [init("w", rng_w(3, 2, 3, 3)), init("w2", rng_w(2, 3))],
        [1, 2, 9, 10],
        [1, 2],
        opset=19,
    )


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "dilations": [3, 3]},
        {"kernel_shape": [3, 2], "dilations": [2, 4], "strides": [2, 1]},
        {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 2, 0, 1], "count_include_pad": 1},
        {"kernel_shape": [2, 2], "dilations": [2, 3], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [3, 2], "dilations": [2, 2], "pads": [2, 1, 2, 1], "count_include_pad": 1},
    ],
)
def test_average_pool_dilations_match_onnxruntime(attrs: dict) -> None:
    """Dilations are honoured (was: ignored, so the IR pooled neighbouring pixels)."""
    _matches_ort(_dilated_pool(**attrs), [1, 2, 9, 10])


def test_average_pool_ceil_mode_checks_the_dilated_window() -> None:
    # W = 10, k = 2, s = 2: undilated (10 - 2) % 2 = 0 (exact), but with d = 4 the window
    # spans (k - 1) d + 1 = 5 and (10 - 5) % 2 = 1 leaves a partial last window
    data = _dilated_pool(kernel_shape=[1, 2], dilations=[1, 4], strides=[1, 2], ceil_mode=1)
    _refused(data, "unsupported-attribute", "pool", "AveragePool", "ceil_mode")


@pytest.mark.parametrize("op", ["Conv", "AveragePool"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_with_dilations_is_refused(op: str, auto_pad: str) -> None:
    """onnxruntime 1.23 refuses SAME + dilations for Conv, and for AveragePool pads as if the
    window were undilated (not the spec's output shape): no agreed meaning, so refused."""
    attrs = {"auto_pad": auto_pad, "dilations": [2, 2]}
    if op == "Conv":
        node = helper.make_node("Conv", ["x", "w"], ["h"], name="n", **attrs)
    else:
        node = helper.make_node(
            "AveragePool", ["x"], ["h"], name="n", kernel_shape=[3, 2], count_include_pad=1, **attrs
        )
    data = make_model(
        [node, helper.make_node("ReduceSum", ["h"], ["y"], keepdims=0)],
        [init("w", rng_w(2, 1, 3, 2))] if op == "Conv" else [],
        [1, 1, 7, 8],
        [],
        opset=19,
    )
    _refused(data, "unsupported-attribute", "'n'", op, "auto_pad", "dilations")


# ---------------------------------------------------------------- F3: Shape start/end
@pytest.mark.parametrize(
    ("start", "end"), [(1, 2), (-2, None), (0, -1), (1, 3), (-3, -2), (2, 100), (-100, 2)]
)
def test_shape_start_end_match_onnxruntime(start: int, end: int | None) -> None:
    """Reshape to [-1, last dim of shape[start:end]], then Transpose: the slice decides the
    feature order the Gemm sees."""
    kw = {"start": start} | ({} if end is None else {"end": end})
    data = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], **kw),
            helper.make_node("Gather", ["s", "last"], ["d"], axis=0),
            helper.make_node("Concat", ["minus1", "d"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
            helper.make_node("Flatten", ["t"], ["f"], axis=0),
            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
        ],
        [
            _const("last", np.array([-1], np.int64)),
            _const("minus1", np.array([-1], np.int64)),
            init("w", rng_w(3, 24)),
        ],
        [1, 2, 3, 4],
        [1, 3],
        opset=15,
    )
    _matches_ort(data, [1, 2, 3, 4])


# ---------------------------------------------------------------- F4: integer Div
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8])
@pytest.mark.parametrize(("num", "den", "mul"), [(7, 2, 2), (-7, 2, -2), (7, -2, -2)])
def test_integer_div_truncates_like_onnxruntime(dtype: type, num: int, den: int, mul: int) -> None:
    """Reshape (1, 6, 7) to [-1, (num / den) * mul]: truncation gives 6; true division gave
    7 (a transposed feature order), floor division 8 (42 is not a multiple)."""
    data = make_model(
        [
            helper.make_node("Div", ["n", "d"], ["q"]),
            helper.make_node("Mul", ["q", "m"], ["k"]),
            helper.make_node("Cast", ["k"], ["k64"], to=T.INT64),
            helper.make_node("Concat", ["minus1", "k64"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
            helper.make_node("Flatten", ["t"], ["f"], axis=0),
            helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
        ],
        [
            _const("n", np.array([num], dtype)),
            _const("d", np.array([den], dtype)),
            _const("m", np.array([mul], dtype)),
            _const("minus1", np.array([-1], np.int64)),
            init("w", rng_w(3, 42)),
        ],
        [1, 6, 7],
        [1, 3],
        opset=14,  # int8 Div since 14
    )
    _matches_ort(data, [1, 6, 7])


def test_integer_division_by_zero_is_refused() -> None:
    data = make_model(
        [
            helper.make_node("Div", ["n", "d"], ["q"], name="div0"),
            helper.make_node("Concat", ["minus1", "q"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [
            _const("n", np.array([6], np.int64)),
            _const("d", np.array([0], np.int64)),
            _const("minus1", np.array([-1], np.int64)),
        ],
        [1, 6],
        [1, 6],
    )
    _refused(data, "non-finite", "div0", "division by zero")


# ---------------------------------------------------------------- F5: Dropout
def _dropout(opset: int, inputs: list[str], inits: list, **attrs: object) -> bytes:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Dropout", ["h", *inputs], ["y"], name="drop", **attrs),
        ],
        [init("w", rng_w(4, 8)), *inits],
        [1, 4],
        [1, 8],
        opset=opset,
    )


_RATIO = _const("ratio", np.array(0.5, np.float32))


def test_dropout_in_training_mode_is_refused() -> None:
    train = _dropout(13, ["ratio", "train"], [_RATIO, _const("train", np.array(True))])
    _refused(train, "unsupported-attribute", "drop", "Dropout", "training_mode")
    legacy = _dropout(6, [], [], is_test=0)
    _refused(legacy, "unsupported-attribute", "drop", "Dropout", "is_test")
    legacy_default = _dropout(6, [], [])  # opset < 7: is_test defaults to 0 (training)
    _refused(legacy_default, "unsupported-attribute", "drop", "Dropout", "is_test")


@pytest.mark.parametrize(
    "case",
    ["no-mode", "mode-false", "ratio-only", "opset-10"],
)
def test_dropout_in_inference_mode_is_identity(case: str) -> None:
    data = {
        "no-mode": lambda: _dropout(13, [], []),
        "mode-false": lambda: _dropout(
            13, ["ratio", "train"], [_RATIO, _const("train", np.array(False))]
        ),
        "ratio-only": lambda: _dropout(13, ["ratio"], [_RATIO], seed=3),
        "opset-10": lambda: _dropout(10, [], [], ratio=0.3),
    }[case]()
    _matches_ort(data, [1, 4])


# ---------------------------------------------------------------- the attribute allow-list
def test_every_converter_has_an_attribute_list_of_real_attributes() -> None:
    """Each registered op lists its accepted attributes, and each listed name exists in some
    version of that op's ONNX schema (no typo silently accepting nothing)."""
    assert set(CONVERTERS) <= set(ATTRIBUTES)
    for op, names in ATTRIBUTES.items():
        schema_attrs = {
            a
            for s in onnx.defs.get_all_schemas_with_history()
            if s.name == op
            for a in s.attributes
        }
        assert names <= schema_attrs, (op, names - schema_attrs)


def test_schema_valid_attributes_we_do_not_model_are_refused() -> None:
    """Attributes onnx.checker accepts but lipcert does not model: opset-6 broadcasting Add
    (axis-aligned, not numpy broadcasting) and BatchNormalization spatial=0."""
    add = make_model(
        [helper.make_node("Add", ["x", "b"], ["y"], name="legacy_add", broadcast=1, axis=1)],
        [init("b", rng_w(3))],
        [1, 3, 2, 2],
        [1, 3, 2, 2],
        opset=6,
    )
    _refused(add, "unsupported-attribute", "legacy_add", "Add", "attribute 'axis'")
    c = 3
    bn = make_model(
        [
            helper.make_node(
                "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", spatial=0
            )
        ],
        [init(n, np.abs(rng_w(c)) + 0.5) for n in ("s", "b", "m", "v")],
        [1, c, 2, 2],
        [1, c, 2, 2],
        opset=7,
    )
    _refused(bn, "unsupported-attribute", "bn", "BatchNormalization", "spatial")


def test_unknown_attribute_on_a_supported_op_is_refused() -> None:
    """An attribute outside the op's schema: refused (onnx.checker or the allow-list), never
    ignored, and the message names it."""
    data = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="act", some_option=2)],
        [],
        [1, 3],
        [1, 3],
        check=False,
    )
    err = _refused(data, "malformed", "some_option")
    assert "Relu" in str(err)
    # the allow-list itself, for names the checker does not know about (a newer opset)
    with pytest.raises(ModelRejected) as exc:
        check_attributes("act", "Relu", ["some_option"])
    assert exc.value.code == "unsupported-attribute"
    assert all(w in str(exc.value) for w in ("'act'", "Relu", "'some_option'"))
