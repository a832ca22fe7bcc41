"""The early-stopping Lanczos of the step lengths (sdp.solvers._lanczos) against dense eigh."""

from __future__ import annotations

import numpy as np
import pytest

from sdp.solvers._lanczos import smallest_eigenpair


def _random_symmetric(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.standard_normal((n, n))
    return (a + a.T) / 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tol", [1e-3, 1e-4, 1e-8])
def test_ritz_pair_is_as_accurate_as_its_residual_says(seed: int, tol: float) -> None:
    """theta >= lambda_min (interlacing), the returned residual test holds for the returned
    vector, and the Ritz value is within the residual of lambda_min."""
    rng = np.random.default_rng(seed)
    n = 200
    a = _random_symmetric(rng, n)
    a[np.diag_indices(n)] += np.linspace(-30.0, 5.0, n)  # a separated smallest eigenvalue
    lam = float(np.linalg.eigvalsh(a)[0])
    calls = []

    def mv(v: np.ndarray) -> np.ndarray:
        calls.append(1)
        return a @ v

    pair = smallest_eigenpair(mv, n, tol=tol)
    assert pair is not None
    theta, y = pair
    assert np.linalg.norm(y) == pytest.approx(1.0)
    res = float(np.linalg.norm(a @ y - theta * y))
    assert res <= tol * abs(theta) * (1 + 1e-8) + 1e-10
    assert lam - 1e-9 * abs(lam) <= theta <= lam + res
    assert len(calls) < n  # stopped early, long before the Krylov space is exhausted
    # restarted from its own vector it stops at once, with the same value
    again = smallest_eigenpair(mv, n, y, tol=tol)
    assert again is not None and again[0] == pytest.approx(theta, rel=10 * tol)


def test_exhausted_krylov_space_gives_the_exact_eigenvalue() -> None:
    """Three distinct eigenvalues: the Krylov space is 3-dimensional and beta vanishes."""
    rng = np.random.default_rng(1)
    n = 60
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    vals = np.repeat([-2.0, 1.0, 3.0], n // 3)
    a = (q * vals) @ q.T
    pair = smallest_eigenpair(lambda v: a @ v, n, tol=1e-14)
    assert pair is not None
    assert pair[0] == pytest.approx(-2.0, rel=1e-10)


def test_positive_definite_operator_and_non_finite_products() -> None:
    rng = np.random.default_rng(2)
    n = 120
    b = rng.standard_normal((n, n))
    a = b @ b.T / n + np.eye(n)
    pair = smallest_eigenpair(lambda v: a @ v, n)
    assert pair is not None and pair[0] >= float(np.linalg.eigvalsh(a)[0]) > 0
    assert smallest_eigenpair(lambda v: np.full(n, np.nan), n) is None
    # too few steps allowed: None, the callers then compute the eigenvalue densely
    assert smallest_eigenpair(lambda v: a @ v, n, tol=1e-14, max_steps=2) is None
