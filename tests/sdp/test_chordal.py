"""The chordal (block-tridiagonal) dual of the structured solver (sdp.solvers._chordal): the
max-determinant completion against dense linear algebra, and the interior-point method with
the dual on the pattern against the dense-dual one (same certified optimum)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdp.certificate import Lmi, certify_multipliers, certify_rho, layerwise_multipliers
from sdp.ir import Activation
from sdp.solvers._chordal import ChordalDualOps, DenseDualOps, completion
from sdp.solvers._interior_point import (
    Grouping,
    IpmSettings,
    IpmTuning,
    dual_ops,
    newton_dual_start,
    solve_ipm,
)
from sdp.solvers._lmi_structure import StructuredLmi
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.dense import NumpyOps
from sdp.solvers.structured import StructuredSolver
from tests.sdp._nets import random_lmi

OFFSETS = (0, 3, 7, 9, 14, 20)


def _pattern_mask(offsets: tuple[int, ...]) -> np.ndarray:
    n = offsets[-1]
    blk = np.searchsorted(offsets, np.arange(n), side="right") - 1
    return np.abs(blk[:, None] - blk[None, :]) <= 1


def _spd(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.standard_normal((n, n))
    return a @ a.T / n + 0.1 * np.eye(n)


def test_completion_is_the_max_det_one() -> None:
    """Zh agrees with Z on the pattern, is PD, has a block-tridiagonal inverse (the
    characterisation of the max-det completion), and any other PD completion has a smaller
    determinant; ``times`` is the product with Zh."""
    rng = np.random.default_rng(0)
    n = OFFSETS[-1]
    mask = _pattern_mask(OFFSETS)
    z = _spd(rng, n)
    fac = completion(z, OFFSETS)
    assert fac is not None
    zh = fac.dense()
    np.testing.assert_allclose(zh[mask], z[mask], rtol=0, atol=1e-14)
    assert np.linalg.eigvalsh(zh)[0] > 0
    inv = np.linalg.inv(zh)
    assert np.abs(inv[~mask]).max() < 1e-10 * np.abs(inv).max()
    logdet = np.linalg.slogdet(zh)[1]
    for _ in range(5):  # other completions: perturb off the pattern only
        e = rng.standard_normal((n, n)) * 1e-2
        e = np.where(mask, 0.0, e + e.T)
        other = zh + e
        if np.linalg.eigvalsh(other)[0] > 0:
            assert np.linalg.slogdet(other)[1] < logdet
    k = rng.standard_normal((n, n))
    np.testing.assert_allclose(fac.times(k), zh @ k, rtol=0, atol=1e-12 * np.abs(zh @ k).max())
    np.testing.assert_allclose(fac.times(k, True), zh @ k, rtol=0, atol=1e-5 * np.abs(zh @ k).max())


def test_completion_exists_iff_every_clique_is_pd() -> None:
    """A partial matrix whose every clique block is PD is completable even if Z itself is
    indefinite off the pattern; a clique that is not PD gives None."""
    rng = np.random.default_rng(1)
    n = OFFSETS[-1]
    mask = _pattern_mask(OFFSETS)
    z = _spd(rng, n)
    bad_off = np.where(mask, z, 50.0 * np.sign(rng.standard_normal((n, n))))
    bad_off = np.triu(bad_off) + np.triu(bad_off, 1).T
    assert np.linalg.eigvalsh(bad_off)[0] < 0
    assert completion(bad_off, OFFSETS) is not None
    broken = z.copy()
    broken[10:12, 10:12] -= 10.0  # block 3 (rows 9..13) no longer PD
    assert completion(broken, OFFSETS) is None


def test_pattern_products_and_step_length() -> None:
    """P(Zh K + K^T Zh) by block rows and densely by the factors equal the dense products;
    the clique step length is the boundary of completability (Lanczos above 300 rows)."""
    ops = ChordalDualOps(NumpyOps(), OFFSETS)
    rng = np.random.default_rng(2)
    n = OFFSETS[-1]
    z = ops.project(_spd(rng, n))
    fac = completion(z, OFFSETS)
    assert fac is not None
    zh = fac.dense()
    k = rng.standard_normal((n, n))
    want = 0.5 * (zh @ k + k.T @ zh)
    np.testing.assert_allclose(ops.sym_product(zh, k, 0.5, False), ops.project(want.copy()))
    np.testing.assert_allclose(ops.full_sym_product(fac, k, 0.5, False), want, atol=1e-12)
    np.testing.assert_allclose(
        ops.corrector(want, k, -1.0, False), ops.project(-(want @ k + k.T @ want))
    )
    d = rng.standard_normal((n, n))
    d = ops.project(d + d.T)
    alpha, _ = ops.max_step(fac, d)
    assert completion(z + 0.99 * alpha * d, OFFSETS) is not None
    assert completion(z + 1.01 * alpha * d, OFFSETS) is None
    assert ops.max_step(fac, ops.project(z.copy()))[0] == math.inf
    big = tuple(int(v) for v in np.arange(0, 801, 160))  # 4 cliques of 320: Lanczos
    ops_big = ChordalDualOps(NumpyOps(), big)
    zb = ops_big.project(_spd(rng, 800))
    fb = completion(zb, big)
    assert fb is not None
    db = rng.standard_normal((800, 800))
    db = ops_big.project(db + db.T)
    db[480:640, 480:640] -= 3.0 * np.eye(160)  # the smallest eigenvalue in cliques 2 and 3
    alpha, vecs = ops_big.max_step(fb, db)
    assert vecs is not None and all(v is not None for v in vecs)
    assert completion(zb + 0.99 * alpha * db, big) is not None
    assert completion(zb + 1.03 * alpha * db, big) is None
    again, _ = ops_big.max_step(fb, db, vecs)  # warm: the cliques' vectors as start vectors
    assert again == pytest.approx(alpha, rel=1e-3)


def _dense_and_chordal(lmi: Lmi, variant: str, **kw: float) -> tuple[float, float, object]:
    rhos = []
    sols = []
    for depth in (None, 1):
        solver = StructuredSolver(tuning=IpmTuning(chordal_min_depth=depth))
        sol = solver.solve(LipSdpProblem(lmi, variant), SolveOptions(**kw))  # type: ignore[arg-type]
        assert sol.multipliers is not None and sol.status == "optimal"
        rhos.append(certify_multipliers(lmi, sol.multipliers).rho)
        sols.append(sol)
    return rhos[0], rhos[1], sols[1]


@pytest.mark.parametrize(
    ("act", "variant", "sizes", "seed"),
    [
        (Activation("relu"), "neuron", [12, 10, 9, 8, 7, 3], 3),
        (Activation("leaky_relu", 0.1), "neuron", [10, 8, 8, 8, 2], 4),
        (Activation("tanh"), "layer", [10, 8, 8, 8, 2], 5),
        (Activation("relu"), "neuron", [6, 5, 2], 6),  # one clique: Zh = Z
        (Activation("relu"), "neuron", [10, 8, 8, 8, 8, 8, 8, 2], 7),  # Newton start at depth 6
    ],
    ids=str,
)
def test_chordal_dual_reaches_the_dense_optimum(
    act: Activation, variant: str, sizes: list[int], seed: int
) -> None:
    """Same certified optimum (1e-6 relative) as the dense dual (whose deep nets start from
    Z0 = 100 I / r, the chordal ones from the Newton dual estimate); the dual estimate stays
    below the certified bound."""
    lmi = random_lmi(sizes, act, seed)
    rho_dense, rho_chordal, sol = _dense_and_chordal(lmi, variant, eps=1e-9)
    assert rho_chordal == pytest.approx(rho_dense, rel=1e-6)
    lower = sol.info["lower_bound"]  # type: ignore[attr-defined]
    assert lower is not None and lower <= rho_chordal * (1 + 1e-9)


def test_chordal_dual_from_an_infeasible_start() -> None:
    """S(rho, t0) + pi I start (pi > 0 terms use the completion): the optimum still certifies."""
    lmi = random_lmi([4, 7, 6, 5, 2], Activation("leaky_relu", 0.1), 13)
    st = StructuredLmi.from_lmi(lmi)
    t0 = np.concatenate(layerwise_multipliers(lmi)) * 1e-3
    out = {}
    for depth in (None, 1):
        settings = IpmSettings(eps=1e-9, shift0=0.3, chordal_min_depth=depth)
        res = solve_ipm(st, t0, 0.0, settings, per_layer=False)
        assert res.status == "optimal" and res.history[0]["pi"] > 0
        out[depth] = certify_rho(lmi, np.split(res.t, [7, 13]))
    assert out[1] == pytest.approx(out[None], rel=1e-6)


def test_dual_ops_selection() -> None:
    """Chordal only from ``chordal_min_depth`` on and only on the numpy backend."""
    st = StructuredLmi.from_lmi(random_lmi([4, 5, 5, 5, 2], Activation("relu"), 0))
    assert isinstance(dual_ops(st, IpmTuning(chordal_min_depth=None)), DenseDualOps)
    assert isinstance(dual_ops(st, IpmTuning(chordal_min_depth=3)), ChordalDualOps)
    assert isinstance(dual_ops(st, IpmTuning(chordal_min_depth=4)), DenseDualOps)


def test_newton_start_on_the_pattern() -> None:
    """With the chordal dual the Newton start forms only P(Z) = P(mu X - theta mu X dS X): the
    dense start's Z (linear in theta) projected, taken further (theta keeps P(Z) completable,
    which a PD Z implies)."""
    lmi = random_lmi([6, 9, 8, 7, 3], Activation("relu"), 11)
    st = StructuredLmi.from_lmi(lmi)
    grp = Grouping(st, False)
    sgn = grp.sign_needed(st) > 0
    t0 = np.concatenate(layerwise_multipliers(lmi))
    s = st.assemble(1.1 * certify_rho(lmi, layerwise_multipliers(lmi)), t0)
    xinv = np.linalg.inv(s)
    chordal = ChordalDualOps(NumpyOps(), st.offsets)
    for frac in (0.9, 1e-3):
        dense = newton_dual_start(st, grp, sgn, t0, xinv, frac=frac)
        sparse = newton_dual_start(st, grp, sgn, t0, xinv, frac=frac, dual=chordal)
        assert dense is not None and sparse is not None
        assert sparse.mu == dense.mu and sparse.theta > dense.theta
        assert completion(sparse.zmat, st.offsets) is not None
        base = chordal.project(dense.mu * xinv)
        step = chordal.project(dense.zmat.copy()) - base
        want = base + (sparse.theta / dense.theta) * step
        np.testing.assert_allclose(sparse.zmat, want, atol=1e-10 * np.abs(want).max())
