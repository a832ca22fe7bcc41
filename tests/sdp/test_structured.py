"""The structured LipSDP solver: agreement with an independent CVXPY+Clarabel oracle, soundness
(never below the SDP optimum, every answer verified), anytime behaviour, and its derivatives."""

from __future__ import annotations

import itertools
import math

import cvxpy as cp
import numpy as np
import pytest
import scipy.io

from sdp.certificate import Lmi, certify_multipliers, certify_rho, layerwise_multipliers
from sdp.ir import Activation
from sdp.solvers._interior_point import (
    Grouping,
    IpmSettings,
    IpmTuning,
    _stalled_at_floor,
    _step_fraction,
    newton_dual_start,
    solve_ipm,
)
from sdp.solvers._lmi_structure import (
    StructuredLmi,
    constraint_values,
    constraint_values_banded,
    linear_part_times,
    rank2_blocks,
    reduce_input,
    reduce_input_by,
    schur_matrix,
    sym_product_values,
)
from sdp.solvers.base import LipSdpProblem, SolveOptions, Solver
from sdp.solvers.dense import cholesky_upper, inverse_from_cholesky, max_step
from sdp.solvers.structured import SOLVER, StructuredSolver
from tests.sdp._nets import random_lmi, spd_and_direction

ACTIVATIONS = [
    Activation("relu"),
    Activation("leaky_relu", 0.1),
    Activation("tanh"),
    Activation("sigmoid"),
    Activation("elu", 1.0),
    Activation("softplus"),
    Activation("gelu"),
    Activation("silu"),
]


def reference_rho(lmi: Lmi, variant: str = "neuron") -> float:
    """LipSDP optimum by CVXPY + Clarabel (tight), from design.md §3.2's dense formula:
    M = [A;B]^T [[-2abT, (a+b)T], [(a+b)T, -2T]] [A;B] + blkdiag(-rho I, 0.., W_L^T W_L)."""
    W, L = lmi.weights, lmi.depth
    n0, N = lmi.input_size, sum(lmi.hidden_sizes)
    A = np.zeros((N, n0 + N))
    r = c = 0
    for j in range(L):
        A[r : r + W[j].shape[0], c : c + W[j].shape[1]] = W[j]
        r, c = r + W[j].shape[0], c + W[j].shape[1]
    B = np.hstack([np.zeros((N, n0)), np.eye(N)])
    a, b = np.concatenate(lmi.alpha), np.concatenate(lmi.beta)
    rho = cp.Variable()
    if variant == "neuron":
        t = cp.Variable(N, nonneg=True)
    else:
        lam = cp.Variable(L, nonneg=True)
        t = cp.hstack([lam[j] * np.ones(n) for j, n in enumerate(lmi.hidden_sizes)])
    m = (
        A.T @ cp.diag(cp.multiply(-2 * a * b, t)) @ A
        + A.T @ cp.diag(cp.multiply(a + b, t)) @ B
        + B.T @ cp.diag(cp.multiply(a + b, t)) @ A
        + B.T @ cp.diag(-2 * t) @ B
    )
    e0 = np.zeros((n0 + N, n0 + N))
    e0[:n0, :n0] = np.eye(n0)
    last = np.zeros((n0 + N, n0 + N))
    last[-W[L].shape[1] :, -W[L].shape[1] :] = W[L].T @ W[L]
    m = m - rho * e0 + last
    prob = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    prob.solve(
        solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500
    )
    assert prob.status == "optimal", prob.status
    return float(rho.value)


def reference_rho_blocks(lmi: Lmi) -> float:
    """LipSDP-Neuron optimum by CVXPY + Clarabel, built block by block (fast to canonicalise
    for wider nets): S = -M is block tridiagonal with diagonal blocks
    2 diag(t_{j-1}) + 2 W_j^T diag(a b t_j) W_j (rho I for the input, minus W_L^T W_L last)
    and off-diagonal blocks -diag((a + b) t_j) W_j (design.md §3.2)."""
    W, L = lmi.weights, lmi.depth
    sizes = [lmi.input_size, *lmi.hidden_sizes]
    rho = cp.Variable()
    ts = [cp.Variable(n, nonneg=True) for n in lmi.hidden_sizes]
    a, b = lmi.alpha, lmi.beta
    blocks: list[list[object]] = [[None] * (L + 1) for _ in range(L + 1)]
    for k in range(L + 1):
        diag = rho * np.eye(sizes[0]) if k == 0 else 2 * cp.diag(ts[k - 1])
        if k < L:
            diag = diag + 2 * W[k].T @ cp.diag(cp.multiply(a[k] * b[k], ts[k])) @ W[k]
        else:
            diag = diag - W[L].T @ W[L]
        blocks[k][k] = diag
        for m in range(L + 1):
            if m not in (k - 1, k, k + 1):
                blocks[k][m] = np.zeros((sizes[k], sizes[m]))
        if k < L:
            off = -cp.diag(cp.multiply(a[k] + b[k], ts[k])) @ W[k]
            blocks[k + 1][k] = off
            blocks[k][k + 1] = off.T
    s = cp.bmat(blocks)
    prob = cp.Problem(cp.Minimize(rho), [(s + s.T) / 2 >> 0])
    prob.solve(
        solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500
    )
    assert prob.status == "optimal", prob.status
    return float(rho.value)


def solve_certified(
    lmi: Lmi, variant: str = "neuron", solver: StructuredSolver = SOLVER, **kw: object
) -> tuple[float, object]:
    sol = solver.solve(LipSdpProblem(lmi, variant), SolveOptions(**kw))  # type: ignore[arg-type]
    assert sol.multipliers is not None
    rep = certify_multipliers(lmi, sol.multipliers)
    return rep.rho, sol


def test_implements_solver_protocol() -> None:
    assert isinstance(SOLVER, Solver)
    assert isinstance(SOLVER, StructuredSolver)
    assert SOLVER.name == "structured"
    assert SOLVER.variants == frozenset({"neuron", "layer"})
    assert SOLVER.available()


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_clarabel_and_never_below(act: Activation, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    sizes = [int(v) for v in rng.integers(2, 7, size=int(rng.integers(3, 5)))]
    lmi = random_lmi(sizes, act, seed)
    ref = reference_rho(lmi)
    rho, sol = solve_certified(lmi)
    assert sol.status == "optimal"
    # every answer verified: the returned multipliers certify without any repair
    assert certify_rho(lmi, sol.multipliers) == pytest.approx(rho)
    assert rho >= ref * (1 - 1e-7), "certified bound below the SDP optimum"
    assert math.sqrt(rho) == pytest.approx(math.sqrt(ref), rel=1e-4)


@pytest.mark.parametrize(
    "act", [ACTIVATIONS[0], ACTIVATIONS[1], ACTIVATIONS[3], ACTIVATIONS[6]], ids=str
)
def test_layer_variant_agrees_with_clarabel(act: Activation) -> None:
    lmi = random_lmi([4, 6, 5, 3], act, 7)
    ref = reference_rho(lmi, "layer")
    rho, _ = solve_certified(lmi, "layer")
    assert rho >= ref * (1 - 1e-7)
    assert math.sqrt(rho) == pytest.approx(math.sqrt(ref), rel=1e-4)
    # neuron multipliers can only do better than one per layer
    rho_n, _ = solve_certified(lmi, "neuron")
    assert rho_n <= rho * (1 + 1e-6)


def _mat_lmi(path: object) -> Lmi:
    ws = [np.asarray(w, np.float64) for w in scipy.io.loadmat(path)["weights"].ravel()]
    zeros = tuple(np.zeros(w.shape[0]) for w in ws[:-1])
    ones = tuple(np.ones(w.shape[0]) for w in ws[:-1])
    return Lmi(tuple(ws), zeros, ones)


def test_lipsdp_random_weights_published_values(fixtures_dir: object) -> None:
    lmi = _mat_lmi(fixtures_dir / "lipsdp" / "random_weights.mat")  # type: ignore[operator]
    rho_n, sol = solve_certified(lmi, "neuron")
    rho_l, _ = solve_certified(lmi, "layer")
    assert math.sqrt(rho_n) == pytest.approx(36.482, abs=1e-3)
    assert math.sqrt(rho_l) == pytest.approx(39.839, abs=1e-3)
    # the solver's dual bound brackets the optimum from below
    lb = sol.info["lower_bound"]
    assert lb is not None and lb <= rho_n and lb == pytest.approx(rho_n, rel=1e-5)


def test_lipsdp_mnist_weights(fixtures_dir: object) -> None:
    lmi = _mat_lmi(fixtures_dir / "lipsdp" / "mnist_weights.mat")  # type: ignore[operator]
    rho, _ = solve_certified(lmi)
    assert math.sqrt(rho) == pytest.approx(24.366, abs=2e-3)
    red = reduce_input(lmi)  # same optimum, 50 inputs instead of 784
    rho_red, _ = solve_certified(red)
    assert rho_red == pytest.approx(rho, rel=1e-6)


def test_tiny_time_budget_still_verified() -> None:
    lmi = random_lmi([5, 8, 8, 3], Activation("relu"), 3)
    rho_full, _ = solve_certified(lmi)
    rho_cut, sol = solve_certified(lmi, timeout_s=1e-9)
    assert sol.status == "timeout"
    assert certify_rho(lmi, sol.multipliers) == pytest.approx(rho_cut)
    assert rho_cut >= rho_full * (1 - 1e-9)
    # never worse than the layer-wise start it began from
    assert rho_cut <= certify_rho(lmi, layerwise_multipliers(lmi)) * (1 + 1e-9)


def test_progress_and_warm_start() -> None:
    lmi = random_lmi([4, 7, 6, 2], Activation("tanh"), 5)
    events: list[dict[str, object]] = []
    rho, sol = solve_certified(lmi, progress=events.append)
    assert events and all(e["phase"] == "solve" for e in events)
    rhos = [float(e["rho"]) for e in events]  # type: ignore[arg-type]
    assert all(b <= a for a, b in itertools.pairwise(rhos)), "best rho must not increase"
    assert [e["iteration"] for e in events] == list(range(len(events)))
    # warm-started from its own answer the start is already (near) optimal
    _, sol2 = solve_certified(lmi, warm_start=sol.multipliers)
    assert sol2.info["start_rho"] <= rho * (1 + 1e-6)


def test_input_reduction_is_exact() -> None:
    lmi = random_lmi([30, 5, 4, 2], Activation("relu"), 11)
    red = reduce_input(lmi)
    assert red.input_size == 5
    t = layerwise_multipliers(lmi)
    assert certify_rho(red, t) == pytest.approx(certify_rho(lmi, t), rel=1e-9)
    assert reference_rho(red) == pytest.approx(reference_rho(lmi), rel=1e-6)
    # the block-wise reference formulation agrees with the dense one
    assert reference_rho_blocks(lmi) == pytest.approx(reference_rho(lmi), rel=1e-6)


def test_wide_input_reduction_by_qr_alone_unless_rank_deficient() -> None:
    """A wide, well-conditioned W_0 is reduced to R^T of its QR factors (no SVD: lower
    triangular, n_1 columns); the same optimum as the unreduced LMI. A rank-deficient one
    still goes through the SVD, which drops the null directions."""
    lmi = random_lmi([30, 6, 4, 2], Activation("relu"), 12)
    red = reduce_input(lmi)
    w0 = red.weights[0]
    assert w0.shape == (6, 6) and np.array_equal(w0, np.tril(w0))
    assert np.allclose(w0 @ w0.T, lmi.weights[0] @ lmi.weights[0].T, rtol=1e-12, atol=1e-12)
    t = layerwise_multipliers(lmi)
    assert certify_rho(red, t) == pytest.approx(certify_rho(lmi, t), rel=1e-9)
    low_rank = lmi.weights[0].copy()
    low_rank[-1] = low_rank[0] + low_rank[1]  # rank 5
    deficient = Lmi((low_rank, *lmi.weights[1:]), lmi.alpha, lmi.beta)
    assert reduce_input(deficient).input_size == 5
    assert reduce_input(deficient, rtol=0.0).input_size == 6  # nothing dropped: R^T
    assert [reduce_input_by(x)[1] for x in (lmi, deficient)] == ["qr", "svd"]


def test_no_hidden_layer_is_the_spectral_norm() -> None:
    w = np.random.default_rng(2).standard_normal((3, 5))
    sol = SOLVER.solve(LipSdpProblem(Lmi((w,), (), ())), SolveOptions())
    assert sol.multipliers == ()
    assert sol.rho == pytest.approx(np.linalg.norm(w, 2) ** 2)


def test_schur_matrix_is_the_log_det_hessian() -> None:
    """With Z = X = S^{-1}, M_kl = tr(F_k X F_l X) is the Hessian of -log det S: check it
    against finite differences of the gradient -tr(X F_k) (general slopes, a b != 0)."""
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((n, m)) for n, m in [(4, 3), (5, 4), (2, 5)]]
    lmi = Lmi(
        tuple(ws),
        (rng.uniform(-0.2, 0.3, 4), rng.uniform(0.1, 0.3, 5)),
        (np.ones(4), 2 * np.ones(5)),
    )
    st = StructuredLmi.from_lmi(lmi)
    t = np.concatenate(layerwise_multipliers(lmi)) * rng.uniform(1.0, 1.2, 9)
    rho = 3 * certify_rho(lmi, np.split(t, [4]))

    def grad(rho_: float, t_: np.ndarray) -> np.ndarray:
        x = inverse_from_cholesky(cholesky_upper(st.assemble(rho_, t_)))
        xb = rank2_blocks(st, x)
        return -np.concatenate([[np.trace(xb.y00)], 2 * np.diagonal(xb.uv)])

    x = inverse_from_cholesky(cholesky_upper(st.assemble(rho, t)))
    xb = rank2_blocks(st, x)
    m_rr, m_rt, m_tt = schur_matrix(st.ops, xb, xb)
    hess = np.block([[np.array([[m_rr]]), m_rt[None, :]], [m_rt[:, None], m_tt]])
    h = 1e-6 * rho
    fd = np.empty_like(hess)
    for k in range(10):
        e = np.zeros(10)
        e[k] = h if k == 0 else h * t[k - 1] / rho
        fd[:, k] = (grad(rho + e[0], t + e[1:]) - grad(rho - e[0], t - e[1:])) / (2 * e[k])
    np.testing.assert_allclose(hess, fd, rtol=1e-5, atol=1e-9 * np.abs(hess).max())
    # and the structured product equals the dense one (symmetric Y, as X and Z)
    y = rng.standard_normal((st.n, st.n))
    y += y.T
    dense = st.assemble(0.7, t, constant=False) @ y
    wy = rank2_blocks(st, y).wy
    np.testing.assert_allclose(linear_part_times(st, y, wy, 0.7, t), dense, atol=1e-10)


@pytest.mark.parametrize(
    "act", [ACTIVATIONS[0], ACTIVATIONS[1], ACTIVATIONS[3], ACTIVATIONS[6]], ids=str
)
def test_deep_net_with_very_different_layer_scales(act: Activation) -> None:
    """6 hidden layers of 12 neurons whose weight norms span 1e-2 .. 1e2 (issue 7: deep nets
    stalled from the layer-wise start): still agrees with Clarabel and never goes below."""
    rng = np.random.default_rng(21)
    sizes = [6, *([12] * 6), 3]
    scales = [1e-2, 30.0, 0.05, 100.0, 0.3, 10.0, 1e-1]
    ws = [
        scales[i] * rng.standard_normal((sizes[i + 1], sizes[i])) / math.sqrt(sizes[i])
        for i in range(len(sizes) - 1)
    ]
    a, b = act.slope_bounds
    lmi = Lmi(
        tuple(ws),
        tuple(np.full(w.shape[0], a) for w in ws[:-1]),
        tuple(np.full(w.shape[0], b) for w in ws[:-1]),
    )
    # Clarabel is inaccurate on the raw scales; LipSDP is homogeneous in each layer's scale
    # (W_j -> W_j / c_j multiplies the optimum by prod_j c_j^-2, the multipliers rescale
    # accordingly), so the reference solves the unit-gain net (norm times slope bound 1 per
    # layer: sigmoid's 1/4 per layer would leave an optimum ~1e-8) and scales back
    norms = [float(np.linalg.norm(w, 2)) * max(abs(a), abs(b), 1e-300) for w in ws[:-1]]
    norms.append(float(np.linalg.norm(ws[-1], 2)))
    unit = Lmi(tuple(w / c for w, c in zip(ws, norms, strict=True)), lmi.alpha, lmi.beta)
    ref = reference_rho_blocks(unit) * float(np.prod(np.square(norms)))
    rho, sol = solve_certified(lmi)
    assert sol.status == "optimal", sol.info
    assert certify_rho(lmi, sol.multipliers) == pytest.approx(rho)
    assert rho >= ref * (1 - 1e-7), "certified bound below the SDP optimum"
    assert math.sqrt(rho) == pytest.approx(math.sqrt(ref), rel=1e-4)
    # far below the layer-wise start it began from
    assert rho <= certify_rho(lmi, layerwise_multipliers(lmi))


def test_constraint_values_from_bands_and_products() -> None:
    """<A_i, Y> from Y's block-tridiagonal part, and <A_i, sym(ZX)> from projections, equal
    the full rank-2 projections (general slopes, a b != 0)."""
    rng = np.random.default_rng(8)
    ws = [rng.standard_normal((n, m)) for n, m in [(5, 3), (4, 5), (2, 4)]]
    lmi = Lmi(
        tuple(ws),
        (rng.uniform(-0.2, 0.3, 5), rng.uniform(0.1, 0.3, 4)),
        (np.ones(5), 2 * np.ones(4)),
    )
    st = StructuredLmi.from_lmi(lmi)

    def sym(a: np.ndarray) -> np.ndarray:
        return (a + a.T) / 2

    y, z, x = (sym(rng.standard_normal((st.n, st.n))) for _ in range(3))
    tr, vals = constraint_values(st.ops, rank2_blocks(st, y))
    tr_b, vals_b = constraint_values_banded(st, y)
    assert tr_b == pytest.approx(tr)
    np.testing.assert_allclose(vals_b, vals, atol=1e-12 * np.abs(vals).max())
    # a layer with a = 0 (ReLU-like: no w^T Y w term in the bands)
    relu1 = StructuredLmi.from_lmi(Lmi(lmi.weights, (lmi.alpha[0], np.zeros(4)), lmi.beta))
    assert relu1.ab_layers == (True, False)
    tr, vals = constraint_values(relu1.ops, rank2_blocks(relu1, y))
    np.testing.assert_allclose(
        constraint_values_banded(relu1, y)[1], vals, atol=1e-12 * np.abs(vals).max()
    )
    tr_zx, vals_zx = constraint_values(st.ops, rank2_blocks(st, sym(z @ x)))
    tr_p, vals_p = sym_product_values(st, rank2_blocks(st, z), z, rank2_blocks(st, x), x)
    assert tr_p == pytest.approx(tr_zx)
    np.testing.assert_allclose(vals_p, vals_zx, atol=1e-12 * np.abs(vals_zx).max())


@pytest.mark.parametrize(
    ("act", "per_layer", "shift0"),
    [
        (ACTIVATIONS[0], False, 0.0),
        (ACTIVATIONS[1], False, 0.0),
        (ACTIVATIONS[1], True, 0.0),
        (ACTIVATIONS[0], True, 0.3),
    ],
    ids=str,
)
def test_infeasible_start_reaches_the_optimum(
    act: Activation, per_layer: bool, shift0: float
) -> None:
    """From multipliers 1000x too small and rho = 0, S(rho, t0) is indefinite: the method
    starts at S(rho, t0) + pi I, drives the residual pi to zero and still reaches the optimum
    (per neuron and per layer, with an extra initial shift too); the answer certifies."""
    lmi = random_lmi([4, 7, 6, 2], act, 13)
    st = StructuredLmi.from_lmi(lmi)
    t0 = np.concatenate(layerwise_multipliers(lmi)) * 1e-3
    assert cholesky_upper(st.assemble(0.0, t0)) is None
    settings = IpmSettings(eps=1e-9, shift0=shift0)
    out = solve_ipm(st, t0, 0.0, settings, per_layer=per_layer)
    assert out.status == "optimal"
    assert out.history[0]["pi"] > 0 and out.history[-1]["pi"] == 0.0
    rho = certify_rho(lmi, np.split(out.t, [7]))
    ref = reference_rho(lmi, "layer" if per_layer else "neuron")
    assert rho >= ref * (1 - 1e-7)
    assert rho == pytest.approx(ref, rel=1e-5)


def test_zero_starting_multipliers_and_cancellation() -> None:
    """Zero multipliers where x >= 0 is imposed (leaky ReLU next layer) do not break the start;
    a cancel request stops the solve with the start's scored multipliers."""
    lmi = random_lmi([4, 7, 6, 2], Activation("leaky_relu", 0.1), 3)
    st = StructuredLmi.from_lmi(lmi)
    t0 = np.concatenate(layerwise_multipliers(lmi))
    t0[:3] = 0.0
    out = solve_ipm(st, t0, 0.0, IpmSettings(eps=1e-9), per_layer=False)
    assert out.status == "optimal"
    assert certify_rho(lmi, np.split(out.t, [7])) == pytest.approx(reference_rho(lmi), rel=1e-5)
    rho, sol = solve_certified(lmi, cancelled=lambda: True)
    assert sol.status == "cancelled" and sol.iterations == 0
    assert rho == pytest.approx(certify_rho(lmi, layerwise_multipliers(lmi)), rel=1e-6)


def test_lanczos_step_length_matches_the_dense_one() -> None:
    """Above the dense size limit the step to the PSD boundary comes from Lanczos (then a
    Cholesky check in the solver); it must agree with the dense eigenvalue."""

    s, d = spd_and_direction(5, 400, shift=1.0)
    r = cholesky_upper(s)
    lam = np.linalg.eigvalsh(
        np.linalg.solve(np.linalg.cholesky(s), np.linalg.solve(np.linalg.cholesky(s), d).T)
    )[0]
    alpha, vec = max_step(r, d)
    assert vec is not None and alpha == pytest.approx(-1.0 / lam, rel=1e-2)
    assert alpha == pytest.approx(max_step(r, d, vec)[0], rel=1e-2)  # warm start
    assert max_step(r, d @ d + np.eye(len(d)))[0] == math.inf  # a PSD direction never hits it


def test_float32_predictor_changes_nothing_but_speed() -> None:
    """Early predictor products (and the corrected direction's, ``float32_step``, and the
    projections') run in float32, the corrector's product always; the certified answer equals
    the all-float64 run's (relative 1e-7) and the float32 phase really happened."""
    lmi = random_lmi([20, 30, 30, 30, 5], Activation("relu"), 17)
    events: list[dict[str, object]] = []
    rho_mixed, _ = solve_certified(lmi, eps=1e-9, progress=events.append)
    f64 = StructuredSolver(tuning=IpmTuning(float32_above=math.inf, float32_corrector=None))
    rho_f64, _ = solve_certified(lmi, eps=1e-9, solver=f64)
    assert any(e.get("float32") == 1.0 for e in events)
    assert events[-1].get("float32") == 0.0
    assert rho_mixed == pytest.approx(rho_f64, rel=1e-7)
    # only the predictor's products in float32 (the corrected direction in float64)
    pred_only = StructuredSolver(tuning=IpmTuning(float32_step=False))
    rho_pred, _ = solve_certified(lmi, eps=1e-9, solver=pred_only)
    assert rho_mixed == pytest.approx(rho_pred, rel=1e-7)
    # the corrector's product in float64 once the float32 phase is over
    corr64 = StructuredSolver(tuning=IpmTuning(float32_corrector=None))
    rho_corr64, _ = solve_certified(lmi, eps=1e-9, solver=corr64)
    assert rho_mixed == pytest.approx(rho_corr64, rel=1e-7)
    # the rank-2 projections' products in float64 throughout
    proj64 = StructuredSolver(tuning=IpmTuning(float32_projections=False))
    rho_proj64, _ = solve_certified(lmi, eps=1e-9, solver=proj64)
    assert rho_mixed == pytest.approx(rho_proj64, rel=1e-7)


def test_last_step_by_the_predictor_alone() -> None:
    """When the float64 predictor's own step is predicted to reach the gap target
    (``predictor_finish``), the last iteration takes it without the corrector (sigma 0): the
    solve ends optimal in as many iterations, at the certified bound of the full method up
    to the target, and never on a float32 predictor."""
    lmi = random_lmi([40, 60, 60, 10], Activation("relu"), 0)
    events: list[dict[str, object]] = []
    rho_fin, sol_fin = solve_certified(lmi, progress=events.append)
    full = StructuredSolver(tuning=IpmTuning(predictor_finish=None))
    rho_full, sol_full = solve_certified(lmi, solver=full)
    assert events[-1]["sigma"] == 0.0 and events[-1]["float32"] == 0.0
    assert all(e["sigma"] > 0 for e in events[1:-1])
    assert sol_fin.status == sol_full.status == "optimal"
    assert sol_fin.info["rel_gap"] <= StructuredSolver.default_eps
    assert sol_fin.iterations == sol_full.iterations
    assert rho_fin == pytest.approx(rho_full, rel=StructuredSolver.default_eps)


def test_step_fraction_follows_the_last_step_lengths() -> None:
    """SDPT3's gamma = 0.9 + 0.09 min(a_p, a_d) of the last iteration (0.9 first), the fixed
    ``step_frac`` without it; a deep random net reaches the same certified bound either way."""
    adaptive = IpmTuning(step_frac_adaptive=True, rho_factor=1.05)
    fixed = IpmTuning(step_frac_adaptive=False, step_frac=0.95)
    assert _step_fraction(adaptive, {"a_p": 0.0, "a_d": 0.0}, 0) == pytest.approx(0.9)
    assert _step_fraction(adaptive, {"a_p": 1.0, "a_d": 0.5}, 3) == pytest.approx(0.945)
    assert _step_fraction(adaptive, {"a_p": 1.0, "a_d": 1.0}, 3) == pytest.approx(0.99)
    assert _step_fraction(fixed, {"a_p": 0.2, "a_d": 0.2}, 3) == 0.95
    lmi = random_lmi([20, 30, 30, 30, 30, 5], Activation("relu"), 3)
    rho_adaptive, sol_adaptive = solve_certified(
        lmi, eps=1e-9, solver=StructuredSolver(tuning=adaptive)
    )
    rho_fixed, sol_fixed = solve_certified(lmi, eps=1e-9, solver=StructuredSolver(tuning=fixed))
    assert sol_adaptive.status == sol_fixed.status == "optimal"
    assert rho_adaptive == pytest.approx(rho_fixed, rel=1e-7)


def test_a_gap_that_stops_falling_at_the_float_floor_ends_the_solve() -> None:
    """Below ``floor_gap`` a gap that has not halved in ``floor_window`` iterations stops the
    solve as inaccurate (with the best iterate); above it, or still falling, it goes on. On a
    6-layer leaky net at a target of 1e-11 the numpy backend's dual steps collapse near a gap
    of 3e-10: 36 iterations instead of 134 (optimal, ``floor_gap=None``), the certified bound
    of a solve to 1e-9."""
    tuning = IpmTuning()
    assert _stalled_at_floor([1e-3] * 5 + [5e-9] * 6 + [4e-9] * 5, tuning)
    assert not _stalled_at_floor([1e-3] * 5 + [5e-9] * 6 + [2e-9] * 5, tuning)  # halved
    assert not _stalled_at_floor([1e-3] * 5 + [5e-8] * 11, tuning)  # above the floor
    assert not _stalled_at_floor([5e-9] * 10, tuning)  # not yet a whole window
    lmi = random_lmi([5, 9, 9, 9, 9, 9, 2], Activation("leaky_relu", 0.1), 1)
    rho_stop, sol_stop = solve_certified(lmi, eps=1e-11)
    rho_ref, sol_ref = solve_certified(lmi, eps=1e-9)
    assert sol_stop.status == "inaccurate" and sol_stop.iterations <= 40
    assert sol_stop.info["rel_gap"] < 1e-9
    assert sol_ref.status == "optimal"
    assert rho_stop == pytest.approx(rho_ref, rel=1e-9)


def test_float32_predictor_below_the_float32_phase() -> None:
    """On the dense dual the predictor's products stay float32 down to ``float32_predictor``
    |S| |Z| (below the float32 phase of ``float32_above``, where the corrected direction is
    float64 already): more float32 predictors, the same certified answer as with the
    predictor in float64 from the float32 phase's end on, and a float64 one at the end."""
    lmi = random_lmi([30, 40, 40, 5], Activation("relu"), 5)
    events: list[dict[str, object]] = []
    rho_low, sol_low = solve_certified(lmi, eps=1e-9, progress=events.append)
    f64 = StructuredSolver(tuning=IpmTuning(float32_predictor=None))
    events64: list[dict[str, object]] = []
    rho_64, sol_64 = solve_certified(lmi, eps=1e-9, solver=f64, progress=events64.append)
    assert sol_low.status == sol_64.status == "optimal"
    assert rho_low == pytest.approx(rho_64, rel=1e-7)
    count = sum(e.get("float32") == 1.0 for e in events)
    assert count > sum(e.get("float32") == 1.0 for e in events64), (events, events64)
    assert events[-1].get("float32") == 0.0


def test_float32_projections_equal_float64_ones_to_single_precision() -> None:
    """rank2_blocks(low_precision=True) differs from the float64 blocks only by float32
    rounding of W~^T Y and W~^T Y W~; Y_00 is Y's own float64 block."""
    rng = np.random.default_rng(9)
    lmi = random_lmi([12, 20, 16, 18, 4], Activation("leaky_relu", 0.1), 3)
    st = StructuredLmi.from_lmi(lmi)
    y = rng.standard_normal((st.n, st.n))
    y += y.T
    ref, low = rank2_blocks(st, y), rank2_blocks(st, y, low_precision=True)
    for name in ("uu", "vv", "uv", "u0", "v0", "wy"):
        a, b = getattr(ref, name), getattr(low, name)
        assert b.dtype == np.float64
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name
        assert np.abs(a - b).max() > 0 or name in ("uu", "u0"), name  # really float32
    assert np.array_equal(low.y00, y[: st.r, : st.r])


@pytest.mark.parametrize("act", [ACTIVATIONS[0], ACTIVATIONS[1]], ids=str)
@pytest.mark.parametrize("per_layer", [False, True])
def test_newton_dual_start_solves_the_dual_equations(act: Activation, per_layer: bool) -> None:
    """Z = mu X (S - theta dS) X, z = mu (1/x - theta dx/x^2) from the barrier's Newton step:
    positive definite, and its dual residual is exactly (1 - theta) (mu g - c) with
    g_k = <X, F_k> + w_k / x_k, checked against dense F_k (leaky ReLU: x >= 0 imposed on the
    first layer); with theta = 1 that is dual feasibility, tr Z_00 = 1. With X dS X in
    float32 (the solver's start) the same to single precision."""
    lmi = random_lmi([5, 8, 7, 3], act, 21)
    st = StructuredLmi.from_lmi(lmi)
    grp = Grouping(st, per_layer)
    sgn = grp.sign_needed(st) > 0
    assert sgn.any() == (act.name == "leaky_relu")
    t0 = np.concatenate(layerwise_multipliers(lmi))
    x = np.maximum.reduceat(t0, grp.starts) if per_layer else t0
    rho = 1.1 * certify_rho(lmi, layerwise_multipliers(lmi))
    s = st.assemble(rho, grp.expand(x))
    xinv = np.linalg.inv(s)
    thetas = []
    # 1e-3: a start that takes a small part of the correction; low_precision: X dS X in
    # float32, the dual equations then hold to single precision
    for frac, low in ((0.9, False), (1e-3, False), (0.9, True)):
        dual = newton_dual_start(st, grp, sgn, x, xinv, frac=frac, low_precision=low)
        assert dual is not None and 0 < dual.theta <= 1 and dual.mu > 0
        thetas.append(dual.theta)
        assert np.linalg.eigvalsh(dual.zmat)[0] > 0 and np.all(dual.z[sgn] > 0)
        assert np.all(dual.z[~sgn] == 0)
        m = len(x)
        f = [st.assemble(1.0, np.zeros(st.num_neurons), constant=False)]
        for k in range(m):
            e = np.zeros(m)
            e[k] = 1.0
            f.append(st.assemble(0.0, grp.expand(e), constant=False))
        w = np.concatenate([[0.0], sgn.astype(float)])
        xs = np.concatenate([[1.0], np.where(sgn, x, 1.0)])
        zs = np.concatenate([[0.0], dual.z])
        a_z = np.array([np.vdot(fk, dual.zmat) for fk in f]) + w * zs
        g = np.array([np.vdot(fk, xinv) for fk in f]) + w / xs
        c = np.eye(m + 1)[0]
        np.testing.assert_allclose(
            a_z - c,
            (1 - dual.theta) * (dual.mu * g - c),
            atol=(1e-5 if low else 1e-9) * np.abs(dual.mu * g).max(),
        )
    assert thetas[1] < thetas[0]
    assert thetas[2] == pytest.approx(thetas[0], rel=1e-4)


def test_newton_start_is_where_it_pays() -> None:
    """Shallow nets start from the Newton dual estimate (fewer iterations, same certified
    optimum as the Z0 = 100 I / r start); ``newton_start_depth=0`` keeps the old start."""
    lmi = random_lmi([30, 40, 40, 5], Activation("relu"), 8)
    rho_new, new = solve_certified(lmi, eps=1e-8)
    old_start = StructuredSolver(tuning=IpmTuning(newton_start_depth=0))
    rho_old, old = solve_certified(lmi, eps=1e-8, solver=old_start)
    assert new.status == old.status == "optimal"
    assert rho_new == pytest.approx(rho_old, rel=1e-6)
    assert new.iterations < old.iterations


@pytest.mark.slow
def test_deep_vnncomp_net_converges_without_stalling(fixtures_dir: object) -> None:
    """mnistfc-256x4 (784-256x4-10, a 1280-row LMI) once took 64 iterations from a dual start
    tied to S0^{-1} (30+ of them with dual steps below 0.1). Regression guard on the iteration
    count, not on time: optimal in <= 30 iterations, certified on the original LMI without
    repair, and inside the dual estimate's gap."""
    from sdp.importers import load_model_file

    net = load_model_file(fixtures_dir / "vnncomp2021/benchmarks/mnistfc/mnist-net_256x4.onnx")  # type: ignore[operator]
    lmi = Lmi.from_chain(net.chain())
    sol = SOLVER.solve(LipSdpProblem(lmi), SolveOptions(eps=1e-6))
    assert sol.status == "optimal" and sol.iterations <= 30, (sol.status, sol.iterations)
    rep = certify_multipliers(lmi, sol.multipliers)
    assert rep.note == "verified solver multipliers"
    lower = sol.info["lower_bound"]
    assert lower <= rep.rho <= lower * (1 + 1e-4)
    assert rep.rho < certify_rho(lmi, layerwise_multipliers(lmi)) / 2


def test_solvers_own_their_defaults_and_honour_max_iters() -> None:
    """No tolerance or iteration cap is chosen by the caller: None means the solver's own
    default, and an explicit max_iters is honoured (it was silently capped at 200)."""
    from sdp.solvers.cvxpy_ import CvxpySolver

    assert SOLVER.default_eps == 1e-5 and SOLVER.default_max_iters == 200
    assert CvxpySolver("scs").default_eps == 1e-6 and CvxpySolver("clarabel").default_eps == 1e-8
    lmi = random_lmi([20, 30, 30, 30, 5], Activation("relu"), 17)
    _, capped = solve_certified(lmi, eps=1e-12, max_iters=3)
    assert capped.iterations == 3 and capped.status == "inaccurate"
    _, longer = solve_certified(lmi, eps=1e-12, max_iters=250)
    assert longer.iterations > 3
    with pytest.raises(ValueError):
        SolveOptions(max_iters=0)
    with pytest.raises(ValueError):
        SolveOptions(eps=-1.0)


def test_reduced_problems_are_not_reduced_twice() -> None:
    """One reduction chain: InputReduction marks its problem, and the structured solver
    then solves it as given (the same multipliers as reducing inside the solver)."""
    from sdp.bounds.reduction import InputReduction
    from sdp.solvers._lmi_structure import INPUT_RTOL

    rng = np.random.default_rng(4)
    lmi = random_lmi([40, 12, 8, 3], Activation("relu"), 4)
    w0 = lmi.weights[0]
    w0 = w0[:, :5] @ rng.standard_normal((5, 40))  # rank 5 < 12 hidden < 40 inputs
    lmi = Lmi((w0, *lmi.weights[1:]), lmi.alpha, lmi.beta)
    problem, inverse = InputReduction(rel_tol=INPUT_RTOL).apply(LipSdpProblem(lmi))
    assert problem.input_reduced and inverse["rank"] == 5 == problem.lmi.input_size
    once = SOLVER.solve(problem, SolveOptions(eps=1e-9))
    inside = SOLVER.solve(LipSdpProblem(lmi), SolveOptions(eps=1e-9))
    assert once.info["reduced_input"] == inside.info["reduced_input"] == 5
    rho_once = certify_multipliers(lmi, once.multipliers).rho
    rho_inside = certify_multipliers(lmi, inside.multipliers).rho
    assert rho_once == pytest.approx(rho_inside, rel=1e-6)
