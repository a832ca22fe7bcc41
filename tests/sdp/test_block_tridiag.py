"""Block-tridiagonal algebra of the structured solver (sdp.solvers._block_tridiag) against
dense LAPACK on random SPD block-tridiagonal matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.solvers._block_tridiag import (
    BlockTridiag,
    BlockTridiagOps,
    block_cholesky,
)
from sdp.solvers.dense import NumpyOps, cholesky_upper, max_step


def _random_spd(rng: np.random.Generator, sizes: list[int], shift: float) -> BlockTridiag:
    """A random symmetric block-tridiagonal matrix, made PD by a diagonal shift relative to
    its own smallest eigenvalue (``shift`` > 0) or left indefinite (``shift`` < 0)."""
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))
    diag = []
    for n in sizes:
        a = rng.standard_normal((n, n))
        diag.append(a + a.T)
    sub = [rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(len(sizes) - 1)]
    m = BlockTridiag(diag, sub, offsets)
    lam = float(np.linalg.eigvalsh(m.to_dense())[0])
    for d in diag:
        d[np.diag_indices(len(d))] += shift - lam
    return m


sizes_st = st.lists(st.integers(1, 7), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 2**31 - 1), shift=st.floats(1e-3, 10.0))
def test_block_factor_inverse_and_solves_equal_dense(
    sizes: list[int], seed: int, shift: float
) -> None:
    rng = np.random.default_rng(seed)
    m = _random_spd(rng, sizes, shift)
    dense = m.to_dense()
    fac = block_cholesky(m)
    assert fac is not None
    r_dense = cholesky_upper(dense)
    assert r_dense is not None
    n = m.n
    # the block factor is the dense factor (unique with a positive diagonal)
    r_block = np.zeros((n, n))
    o = m.offsets
    for k, rk in enumerate(fac.diag):
        r_block[o[k] : o[k + 1], o[k] : o[k + 1]] = rk
    for k, uk in enumerate(fac.upper):
        r_block[o[k] : o[k + 1], o[k + 1] : o[k + 2]] = uk
    cond = np.linalg.cond(dense)
    tol = 1e-12 * cond * max(1.0, float(np.abs(dense).max()))
    np.testing.assert_allclose(r_block, r_dense, atol=tol)
    np.testing.assert_allclose(fac.inverse(), np.linalg.inv(dense), atol=tol * cond)
    assert fac.logdet() == pytest.approx(np.linalg.slogdet(dense)[1], abs=1e-9 * n * cond)
    v = rng.standard_normal((n, 2))
    np.testing.assert_allclose(r_dense @ fac.solve_upper(v), v, atol=tol * cond)
    np.testing.assert_allclose(r_dense.T @ fac.solve_upper_transposed(v), v, atol=tol * cond)
    np.testing.assert_allclose(m.matvec(v), dense @ v, atol=1e-12 * float(np.abs(dense).max()))
    assert BlockTridiag.from_dense(dense, m.offsets).to_dense() == pytest.approx(dense)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes_st, seed=st.integers(0, 2**31 - 1))
def test_block_factor_refuses_indefinite(sizes: list[int], seed: int) -> None:
    m = _random_spd(np.random.default_rng(seed), sizes, -1e-2)
    assert block_cholesky(m) is None
    assert cholesky_upper(m.to_dense()) is None


@pytest.mark.parametrize("n_blocks,size", [(3, 4), (5, 80), (3, 150)])
def test_block_step_length_equals_dense(n_blocks: int, size: int) -> None:
    """Largest alpha with S + alpha D >= 0: block solves (dense eigenvalue when small,
    Lanczos above dense_max rows; on few blocks with float32 products on the dense factor)
    against the dense routine."""
    rng = np.random.default_rng(n_blocks)
    s = _random_spd(rng, [size] * n_blocks, 1.0)
    d = _random_spd(rng, [size] * n_blocks, -5.0)
    ops = BlockTridiagOps(s.offsets, dense_max=100)
    fac = ops.cholesky_upper(s.to_dense())
    alpha, _ = ops.max_step(fac, d.to_dense())
    ref, _ = max_step(cholesky_upper(s.to_dense()), d.to_dense())
    assert math.isfinite(ref)
    assert alpha == pytest.approx(ref, rel=1e-5)
    # nonnegative directions have no limit
    assert ops.max_step(fac, s.to_dense())[0] == math.inf


@pytest.mark.parametrize("n_blocks,size", [(3, 5), (4, 30)])
def test_factor_of_a_step_equals_the_factor_of_the_sum(n_blocks: int, size: int) -> None:
    """cholesky_upper_of_step(base, d, alpha) (bands only; dense: in place) is the factor of
    base + alpha d, and None where that is not positive definite."""
    rng = np.random.default_rng(size)
    s = _random_spd(rng, [size] * n_blocks, 1.0).to_dense()
    d = _random_spd(rng, [size] * n_blocks, -5.0).to_dense()
    ops = BlockTridiagOps(tuple(range(0, (n_blocks + 1) * size, size)))
    alpha_max, _ = max_step(cholesky_upper(s), d)
    for alpha in (0.5 * alpha_max, 0.99 * alpha_max):
        ref = cholesky_upper(s + alpha * d)
        fac = ops.cholesky_upper_of_step(s, d, alpha)
        assert ref is not None and fac is not None
        np.testing.assert_allclose(fac.dense32, ref, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(NumpyOps().cholesky_upper_of_step(s, d, alpha), ref)
    assert ops.cholesky_upper_of_step(s, d, 1.5 * alpha_max) is None
    assert NumpyOps().cholesky_upper_of_step(s, d, 1.5 * alpha_max) is None
    s_copy, d_copy = s.copy(), d.copy()
    ops.cholesky_upper_of_step(s, d, 0.5 * alpha_max)
    NumpyOps().cholesky_upper_of_step(s, d, 0.5 * alpha_max)
    assert np.array_equal(s, s_copy) and np.array_equal(d, d_copy)  # inputs untouched
