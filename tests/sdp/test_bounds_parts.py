"""The pieces behind compute_bound: registry, reductions, lower bound, dense/conv norms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sdp.bounds.compute import AUTO_REFINE_SHARE, AUTO_TIMEOUT_S, _lower_bound_limit, compute_bound
from sdp.bounds.linear_fold import LinearFold
from sdp.bounds.lower import (
    activation_derivative,
    empirical_lower_bound,
    jacobian_vector,
    vector_jacobian,
)
from sdp.bounds.reduction import InputReduction
from sdp.certificate import Lmi, certify_rho, layerwise_multipliers
from sdp.errors import SolverError
from sdp.ir import Activation, Conv2d, Dense, Network
from sdp.solvers import available_solvers, get_solver, solver_names
from sdp.solvers.base import LipSdpProblem, Solver
from tests.sdp._nets import dense_network, random_network


def test_registry():
    assert {"scs", "clarabel", "structured"} <= set(solver_names())
    assert "scs" in available_solvers()
    assert isinstance(get_solver("scs"), Solver)
    with pytest.raises(SolverError) as e:
        get_solver("nope")
    assert e.value.code == "solver-unknown"


def test_input_reduction_keeps_rho_of_any_multipliers():
    rng = np.random.default_rng(0)
    net = random_network(rng, [20, 5, 6, 3])
    lmi = Lmi.from_chain(net.chain())
    red = InputReduction()
    prob = LipSdpProblem(lmi, "neuron")
    assert red.accepts(prob)
    small, inverse = red.apply(prob)
    assert small.lmi.input_size == 5
    assert inverse == {"input_size": 20, "rank": 5, "factorisation": "qr"}
    t = layerwise_multipliers(lmi)
    assert certify_rho(small.lmi, t) == pytest.approx(certify_rho(lmi, t), rel=1e-9)


def test_input_reduction_rel_tol_is_what_its_docstring_says():
    """rel_tol 0 (default) keeps every singular value, exact zeros included; rel_tol > 0
    drops those at or below rel_tol * s_max."""
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((5, 2)) @ rng.standard_normal((2, 20))  # rank 2, n1 = 5 < n0 = 20
    w1 = rng.standard_normal((3, 5))
    lmi = Lmi((w0, w1), (np.zeros(5),), (np.ones(5),))
    prob = LipSdpProblem(lmi, "neuron")
    kept, inverse = InputReduction().apply(prob)
    assert inverse["rank"] == 5 and kept.lmi.input_size == 5
    assert InputReduction().note(inverse) == (
        "exact QR input reduction 20 -> 5 inputs (W_0 = R^T Q^T, nothing dropped)"
    )
    red = InputReduction(rel_tol=1e-12)
    dropped, inverse = red.apply(prob)
    assert inverse["rank"] == 2 and dropped.lmi.input_size == 2
    assert red.note(inverse) == (
        "SVD input reduction 20 -> 2 inputs (singular values <= 1e-12 s_max dropped)"
    )


def test_linear_fold_merges_and_lifts():
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((4, 3)), rng.standard_normal((5, 4)), rng.standard_normal((2, 5))]
    ops = (
        Dense(ws[0], np.zeros(4)), Activation("relu"), Dense(ws[1], np.zeros(5)),
        Activation("leaky_relu", 2.0), Dense(ws[2], np.zeros(2)),
    )  # fmt: skip
    lmi = Lmi.from_chain(Network((3,), ops).chain())
    lmi = Lmi(lmi.weights, (lmi.alpha[0], np.full(5, 2.0)), (lmi.beta[0], np.full(5, 2.0)))
    fold = LinearFold()
    folded, kept = fold.apply(lmi)
    assert kept == [0] and folded.depth == 1
    assert np.allclose(folded.weights[-1], 2.0 * ws[2] @ ws[1])
    t = layerwise_multipliers(folded)
    lifted = fold.lift(lmi, t, kept)
    assert lifted is not None
    assert lifted[0] >= certify_rho(folded, t) * (1 - 1e-6)


@pytest.mark.parametrize(
    "phi",
    [Activation(n, p) for n, p in [("relu", 0), ("leaky_relu", 0.1), ("tanh", 0), ("sigmoid", 0),
     ("elu", 1.0), ("softplus", 0), ("identity", 0), ("gelu", 0), ("silu", 0)]],
)  # fmt: skip
def test_activation_derivative_finite_difference_and_slopes(phi):
    x = np.linspace(-4, 4, 801) + 1e-3
    h = 1e-6
    fd = (phi(x + h) - phi(x - h)) / (2 * h)
    d = activation_derivative(phi, x)
    assert np.allclose(d, fd, atol=1e-5)
    a, b = phi.slope_bounds
    assert np.all(d >= a - 1e-12) and np.all(d <= b + 1e-12)


def test_jvp_vjp_are_adjoint_and_match_finite_differences():
    rng = np.random.default_rng(2)
    conv = Conv2d(rng.standard_normal((2, 1, 3, 3)), rng.standard_normal(2), (1, 5, 5))
    ops = (conv, Activation("tanh"), Dense(rng.standard_normal((3, 18)), rng.standard_normal(3)))
    net = Network((1, 5, 5), ops)
    x, v, u = (
        rng.standard_normal((2, 25)),
        rng.standard_normal((2, 25)),
        rng.standard_normal((2, 3)),
    )
    jv = jacobian_vector(net, x, v)
    jtu = vector_jacobian(net, x, u)
    assert np.allclose(np.sum(jv * u, 1), np.sum(v * jtu, 1))
    fd = (net.forward(x + 1e-6 * v) - net.forward(x - 1e-6 * v)) / 2e-6
    assert np.allclose(jv, fd, atol=1e-6)


@pytest.mark.parametrize("zero", [0, 1, 2])  # which of three weight matrices is zero
@pytest.mark.parametrize("method", ["lipsdp-neuron", "lipsdp-layer", "auto"])
def test_a_zero_layer_gives_a_verified_tiny_bound_not_a_crash(zero: int, method: str) -> None:
    """A zero weight matrix makes the network constant (L = 0). A zero first layer left the
    reduced LMI without inputs and the interior-point method divided by rho = 0 (found by
    review: ZeroDivisionError as a 500 on an accepted model). A zero later layer made the
    interior-point iterates drift until "overflow in multiply" in its Schur scaling: no solver
    runs now, the scaled layer-wise certificate is proved instead."""
    rng = np.random.default_rng(zero)
    ws = [rng.standard_normal(s) for s in [(6, 5), (4, 6), (3, 4)]]
    ws[zero] = np.zeros_like(ws[zero])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = compute_bound(dense_network(ws, "tanh"), method, pairwise=True)
    assert res.verified and 0.0 <= res.value < 1e-90, (res.value, res.notes)
    note = f"weight matrix {zero} is zero: the network is constant, scaled certificate"
    assert any(n.endswith(note) for n in res.notes)  # "auto" may report naive, pairwise not
    assert res.pairwise is not None and np.all(res.pairwise < 1e-90)


def test_lower_bound_stops_at_its_deadline_with_a_valid_ratio():
    """A spent time limit skips power iteration and refinement: the answer is then the ratio of
    the random starts and directions alone (the same draws as iters=0, refine_steps=0)."""
    net = random_network(np.random.default_rng(3), [6, 12, 12, 3], "relu")
    spent = empirical_lower_bound(net, time_limit_s=0.0)
    assert spent == empirical_lower_bound(net, iters=0, refine_steps=0)
    full = empirical_lower_bound(net)
    assert 0.0 < spent <= full <= compute_bound(net, "naive", lower_bound=False).value


def test_auto_gives_the_lower_bound_what_its_limit_leaves():
    share = (1.0 - AUTO_REFINE_SHARE) * AUTO_TIMEOUT_S
    assert _lower_bound_limit("auto", None, 10.0) == pytest.approx(AUTO_TIMEOUT_S - 10.0)
    assert _lower_bound_limit("auto", None, AUTO_TIMEOUT_S) == pytest.approx(share)
    assert _lower_bound_limit("auto", 20.0, 1.0) == pytest.approx(19.0)
    assert _lower_bound_limit("lipsdp-neuron", 20.0, 1.0) is None
