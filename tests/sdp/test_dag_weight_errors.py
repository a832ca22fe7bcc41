"""lipsdp-dag multiplies consecutive affine maps and sums a residual block's paths in float64
(``DagLmi.from_network``): the DAG carries a bound of each such matrix's rounding and the
check proves the LMI for every exact matrix within it (the chain's fix of session 11,
sdp.ir.composition_error, carried over to the DAG; design.md §3.6)."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.bounds.compute import compute_bound
from sdp.bounds.recheck import recheck_document
from sdp.bounds.residual import (
    DagLmi,
    DagNode,
    certify_dag,
    dag_bound,
    dag_weight_error_shifts,
    verify_dag,
    verify_dag_on,
)
from sdp.errors import CertificateError, LipcertError
from sdp.ir import Activation, Dense, Network, Residual

_Q = list[list[Fraction]]


def _q(a: np.ndarray) -> _Q:
    return [[Fraction(float(x)) for x in row] for row in a]


def _q_mul(a: _Q, b: _Q) -> _Q:
    return [
        [sum((x * y for x, y in zip(r, c, strict=True)), Fraction(0)) for c in zip(*b, strict=True)]
        for r in a
    ]


def _q_add(a: _Q, b: _Q) -> _Q:
    return [[x + y for x, y in zip(r, s, strict=True)] for r, s in zip(a, b, strict=True)]


def _frobenius_gap_squared(fl: np.ndarray, exact: _Q) -> Fraction:
    return sum(
        (
            (Fraction(float(x)) - y) ** 2
            for r, s in zip(fl, exact, strict=True)
            for x, y in zip(r, s, strict=True)
        ),
        Fraction(0),
    )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1), st.sampled_from([1.0, 1e20])
)
def test_the_walk_bounds_products_and_sums_exactly(n: int, m: int, seed: int, scale: float):
    """y = W3 (W2 W1 x + S x): the output's float matrix fl(W3 fl(fl(W2 W1) + S)) is within its
    error bound of the exact W3 (W2 W1 + S) (rationals; ||.||_2 <= ||.||_F), also where the
    float product cancels (entries 1 and 2^-60 of one scale)."""
    rng = np.random.default_rng(seed)
    w1 = rng.choice([-1.0, 1.0, 2.0**-60, 0.5], size=(m, n)) * scale
    w2 = rng.choice([-1.0, 1.0, 3.0, 2.0**-60], size=(n, m))
    s = rng.choice([-1.0, 0.1, 2.0**-60], size=(n, n)) * scale
    w3 = rng.choice([1.0, -0.3, 1e-8], size=(2, n))
    z = np.zeros
    net = Network(
        (n,), (Residual((Dense(w1, z(m)), Dense(w2, z(n))), (Dense(s, z(n)),)), Dense(w3, z(2)))
    )
    lmi = DagLmi.from_network(net)
    [(j, fl)] = lmi.output
    exact = _q_mul(_q(w3), _q_add(_q_mul(_q(w2), _q(w1)), _q(s)))
    gap2 = _frobenius_gap_squared(fl, exact)
    bound = lmi.output_error_list()[0]
    assert j == 0 and gap2 <= Fraction(bound) ** 2
    assert bound > 0  # two products and a sum: never taken as exact


def _cancelling_residual() -> Network:
    """z = relu(w_a x); y = w_o (W_2 W_1 z + z): fl(W_2 W_1) = 0 in float64, while the exact
    product's first row is -1e20 2^-60 (1, 1, 1, 1)."""
    w_a = np.array([[1.0], [2.0], [0.5], [1.5]])
    w_1 = 1e20 * np.array([[1.0] * 4, [2.0**-60] * 4, [1.0] * 4])
    w_2 = np.array([[-1.0, -1.0, 1.0]] + [[0.0] * 3] * 3)
    w_o = np.array([[1.0, 0.0, 0.0, 0.0]])
    z = np.zeros
    return Network(
        (1,),
        (
            Dense(w_a, z(4)),
            Activation("relu"),
            Residual((Dense(w_1, z(3)), Dense(w_2, z(4)))),
            Dense(w_o, z(1)),
        ),
    )


def _exact(ops: tuple, v: _Q) -> _Q:
    """The network's value at the column v in rationals (Dense, ReLU, Residual only)."""
    for op in ops:
        if isinstance(op, Dense):
            v = _q_add(_q_mul(_q(op.weight), v), _q(op.bias[:, None]))
        elif isinstance(op, Activation):
            assert op.name == "relu"
            v = [[max(x, Fraction(0)) for x in row] for row in v]
        else:
            assert isinstance(op, Residual)
            v = _q_add(_exact(op.body, v), _exact(op.shortcut, v) if op.shortcut else v)
    return v


def _exact_gap(net: Network, x: float, x2: float) -> Fraction:
    """|f(x) - f(x2)| of a one-input, one-output network, in rationals."""
    return abs(_exact(net.ops, [[Fraction(x)]])[0][0] - _exact(net.ops, [[Fraction(x2)]])[0][0])


def _cancelling_at_the_input(scale: float, act: Activation = Activation("relu")) -> Network:
    """y = act(fl(w_2 w_1) x + x) with fl(w_2 w_1) = 0, exact -scale 2^-60: the node reads the
    input through a rounded product and sum (shifts on the node and on the input block)."""
    w_1 = scale * np.array([[1.0], [2.0**-60], [1.0]])
    w_2 = np.array([[-1.0, -1.0, 1.0]])
    z = np.zeros
    block = Residual((Dense(w_1, z(3)), Dense(w_2, z(1))))
    return Network((1,), (block, act, Dense(np.ones((1, 1)), z(1))))


def test_a_cancelling_residual_body_is_not_taken_as_exact():
    """Before: the DAG took fl(W_2 W_1) = 0 as exact and certified 1.618 for a function with
    |f(1) - f(0)| = 432.68 (rationals). Now the bound is at least that, verify_dag_on and the
    document re-check re-prove it, and the old certificate fails against the errors."""
    net = _cancelling_residual()
    body = net.ops[2]
    assert isinstance(body, Residual)
    w_1, w_2 = (op.weight for op in body.body if isinstance(op, Dense))
    assert not np.any(w_2 @ w_1)  # the float product cancelled
    exact_gap = _exact_gap(net, 1.0, 0.0)
    assert exact_gap > 432
    res = compute_bound(net, "lipsdp-dag", lower_bound=False)
    assert res.verified and res.certificate is not None
    assert Fraction(res.value) >= exact_gap
    assert verify_dag_on(net, res.certificate)
    lmi = DagLmi.from_network(net)
    assert lmi.has_weight_errors
    as_exact = replace(lmi, output_errors=())  # what the check saw before
    t_old = tuple(np.full(n, 1.0) for n in lmi.hidden_sizes)
    rho_old = certify_dag(as_exact, t_old)
    assert rho_old < 10
    cert_old = replace(res.certificate, rho=rho_old, multipliers=t_old)
    assert not verify_dag(lmi, cert_old) and not verify_dag_on(net, cert_old)
    # the re-check of a worker's document (design.md §1.5) goes through the same check
    for cert, ok in ((res.certificate, True), (cert_old, False)):
        doc = {
            "lipschitz_bound": cert.lipschitz_bound,
            "method": "lipsdp-dag",
            "verified": True,
            "certificate": json.loads(cert.to_json()),
        }
        if ok:
            recheck_document(net, doc)
        else:
            with pytest.raises(CertificateError):
                recheck_document(net, doc)


@pytest.mark.parametrize("scale", [1e20, 1e13])
def test_a_cancelling_product_read_from_the_input(scale: float):
    """At scale 1e20 the float LMI sees relu(x) (Lip 1) while the exact function rises by 85.7
    from x = 0 to x = -1; the coupling's error (~7e4) is far above the node's multiplier, so
    the node takes a small part of it and the input the rest (AM-GM; an even split could never
    certify: the node's part alone exceeds its pivot). At 1e13 the error is ~7e-3. Both
    certify a bound above the exact function's difference."""
    net = _cancelling_at_the_input(scale)
    assert _exact_gap(net, -1.0, 0.0) > 85 if scale == 1e20 else True
    res = compute_bound(net, "lipsdp-dag", lower_bound=False)
    assert res.verified and res.certificate is not None
    assert Fraction(res.value) >= _exact_gap(net, -1.0, 0.0)
    assert verify_dag_on(net, res.certificate)


@pytest.mark.parametrize("act", [Activation("relu"), Activation("leaky_relu", 0.5)])
def test_the_certificate_covers_the_worst_exact_coupling(act: Activation):
    """At 1e13 the certificate holds for the exact coupling at either edge of the bound, 1 + e
    and 1 - e (this needs the shifts on both nodes of the coupling, and for leaky ReLU, a b > 0,
    the own term's on the input)."""
    net = _cancelling_at_the_input(1e13, act)
    cert = dag_bound(net).certificate
    assert verify_dag_on(net, cert)
    lmi = DagLmi.from_network(net)
    [node] = lmi.nodes
    [(j, a)], [e] = node.sources, node.source_errors
    assert j == 0 and a.tolist() == [[1.0]] and 1e-3 < e < 1e-1
    for a_star in (a + e, a - e):
        edge = replace(lmi, nodes=(replace(node, sources=((0, a_star),), source_errors=()),))
        assert cert.rho >= certify_dag(edge, cert.multipliers)


@pytest.mark.parametrize("sign_a", [1.0, -1.0])
@pytest.mark.parametrize("sign_o", [1.0, -1.0])
def test_the_shifts_cover_the_exact_matrices_at_the_edge(sign_a: float, sign_o: float):
    """y = o phi(a x), one neuron, slopes [0.5, 1] (a b > 0: own term), a = 100 +- e, o = 1 +- f.
    G = -M without rho, by hand: G_00 = 2 a b t A^2, G_10 = -(a+b) t A, G_11 = 2 t - O^2. The
    change G(A*, O*) - G(A, O) plus diag(delta) must be PSD: the own term's change (-4 a b t A e,
    on the input) dominates, so each of the coupling, own and output shifts is needed."""
    lo, hi, t, e, f = 0.5, 1.0, 1.0, 1e-3, 1e-3
    node = DagNode(((0, np.array([[100.0]])),), np.array([lo]), np.array([hi]), (e,))
    lmi = DagLmi(1, (node,), ((1, np.array([[1.0]])),), (f,))
    delta = dag_weight_error_shifts(lmi, [np.array([t])])

    def g(a: float, o: float) -> np.ndarray:
        return np.array(
            [[2 * lo * hi * t * a * a, -(lo + hi) * t * a], [-(lo + hi) * t * a, 2 * t - o * o]]
        )

    change = g(100.0 + sign_a * e, 1.0 + sign_o * f) - g(100.0, 1.0)
    assert np.linalg.eigvalsh(change + np.diag([delta[0], delta[1]]))[0] >= 0


def test_a_rounded_sum_carries_its_rounding():
    """y = (W + I) x with 1 + 2^-60 on W + I's diagonal: fl rounds it to 1; the bound covers
    the exact difference (rationals) and is not 0."""
    w = np.array([[2.0**-60, 3.0], [0.25, 2.0**-60]])
    net = Network((2,), (Residual((Dense(w, np.zeros(2)),)),))
    lmi = DagLmi.from_network(net)
    [(j, fl)] = lmi.output
    exact = _q_add(_q(w), _q(np.eye(2)))
    gap2 = _frobenius_gap_squared(fl, exact)
    assert j == 0 and gap2 > 0
    assert gap2 <= Fraction(lmi.output_error_list()[0]) ** 2


def test_exact_dags_carry_no_errors():
    """No product or sum formed (every activation reads layers as they are): no bounds, zero
    shifts, so the check is the one before, bit for bit."""
    rng = np.random.default_rng(3)
    w0, w1, w2, s, wo = (rng.standard_normal(sh) for sh in ((6, 4), (5, 6), (5, 5), (5, 6), (3, 5)))
    relu, z = Activation("relu"), np.zeros
    net = Network(
        (4,),
        (
            Dense(w0, z(6)),
            relu,
            Residual((Dense(w1, z(5)), relu, Dense(w2, z(5))), (Dense(s, z(5)),)),
            relu,
            Dense(wo, z(3)),
        ),
    )
    lmi = DagLmi.from_network(net)
    assert not lmi.has_weight_errors
    shifts = dag_weight_error_shifts(lmi, [np.ones(n) for n in lmi.hidden_sizes])
    assert set(shifts.values()) == {0.0}


def test_an_ordinary_net_with_products_certifies_as_its_float_lmi():
    """y = W3 (x + W2 tanh(W1 x)): the output's W3 W2 and W3 (I) carry rounding-sized bounds;
    the certified rho stays within 1e-9 of the float LMI's and verify_dag_on re-proves it."""
    rng = np.random.default_rng(12)
    w1, w2, w3 = (rng.standard_normal(sh) for sh in ((8, 4), (4, 8), (3, 4)))
    block = Residual((Dense(w1, np.zeros(8)), Activation("tanh"), Dense(w2, np.zeros(4))))
    net = Network((4,), (block, Dense(w3, np.zeros(3))))
    lmi = DagLmi.from_network(net)
    assert lmi.has_weight_errors and max(lmi.output_error_list()) < 1e-12
    res = dag_bound(net)
    as_exact = replace(lmi, output_errors=())
    rho_float = certify_dag(as_exact, res.certificate.multipliers)
    assert res.certificate.rho >= rho_float * (1 - 1e-12)
    assert res.certificate.rho == pytest.approx(rho_float, rel=1e-9)
    assert verify_dag_on(net, res.certificate)
    # an output map (a margin row) through the rounded output: still re-proved
    row = np.array([[1.0, -0.7, 0.0]])
    mapped = replace(res.certificate, output_map=row)
    assert verify_dag_on(net, mapped)
    assert DagLmi.from_network(net, output_map=row).output_error_list()[0] > 0


def test_error_bounds_are_validated():
    lmi = DagLmi.from_network(_cancelling_residual())
    with pytest.raises(ValueError):
        replace(lmi, output_errors=(float("nan"),))
    with pytest.raises(ValueError):
        replace(lmi.nodes[0], source_errors=(1.0, 2.0))


def _dense(w: list[list[float]]) -> Dense:
    return Dense(np.array(w), np.zeros(len(w)))


@pytest.mark.parametrize(
    "ops",
    [
        # a constant of 1e160: the recursion's gains (1e320) overflow float64
        (
            _dense([[1e80]]),
            Activation("relu"),
            Residual((_dense([[1.0]]), Activation("relu"), _dense([[1.0]])), ()),
            Activation("relu"),
            _dense([[1e80]]),
        ),
        # a product in the subnormals (1e-340): a pivot of the recursion is not positive
        (
            _dense([[1.0]]),
            Activation("relu"),
            Residual((_dense([[1e-170], [1e-170]]), _dense([[1e-170, -0.999e-170]])), ()),
            Activation("relu"),
            _dense([[1e100]]),
            Activation("relu"),
            _dense([[1e100]]),
        ),
    ],
    ids=["overflow", "subnormal"],
)
def test_scales_beyond_float64_refuse_and_auto_falls_back(ops: tuple) -> None:
    """Scales float64 cannot carry are refused (LipcertError), not a bare ValueError or
    LinAlgError from scipy, so auto falls back to a verified compositional bound."""
    net = Network((1,), ops)
    with pytest.raises(LipcertError):
        dag_bound(net)
    res = compute_bound(net, "auto", lower_bound=False)
    assert res.verified and res.method != "lipsdp-dag"


def test_nodes_of_different_scales_share_the_rounding_by_their_diagonals():
    """W = [[1e20, 1], [1, 1e20]]: the nodes' multipliers differ by 1e80, and the rounding of
    forming the coupling -diag(t_2) fl(W W) (~u |t_2 W W|) was charged to the small node
    multiplied by sqrt(G_11 / G_22) = 1e40, so lipsdp-dag refused. In Jacobi scaling each node's
    part is relative to its own diagonal; the bound is above the exact difference quotient."""
    w = _dense([[1e20, 1.0], [1.0, 1e20]])
    relu = Activation("relu")
    body = Residual((w, w), ())
    net = Network((2,), (w, relu, body, relu, _dense([[1.0, 1.0]])))
    res = dag_bound(net)
    assert verify_dag_on(net, res.certificate)
    gaps = [_exact(net.ops, [[Fraction(a)], [Fraction(b)]])[0][0] for a, b in ((0, 0), (1, 0))]
    assert Fraction(res.value) >= abs(gaps[1] - gaps[0]) > 10**59
