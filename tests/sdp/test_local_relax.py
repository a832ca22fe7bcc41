"""Soundness of the activation relaxations of sdp.local.relax, checked in 60-digit arithmetic."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdp.ir import Activation
from sdp.local.relax import derivative_range, relax
from tests.sdp._local_nets import mp_phi

mpmath.mp.dps = 60

ACTS = [
    Activation("relu"),
    Activation("leaky_relu", 0.1),
    Activation("leaky_relu", -0.3),
    Activation("leaky_relu", 2.0),
    Activation("tanh"),
    Activation("sigmoid"),
    Activation("elu", 1.0),
    Activation("elu", 0.5),
    Activation("elu", 1.7),
    Activation("softplus"),
    Activation("gelu"),
    Activation("silu"),
    Activation("identity"),
]


def exact_phi(phi: Activation, z) -> mpmath.mpf:
    return mp_phi(phi, mpmath.mpf(z))


def check(phi: Activation, l: np.ndarray, u: np.ndarray, samples: int = 9) -> None:
    rel = relax(phi, l[None], u[None])
    for i in range(l.size):
        zs = np.unique(np.concatenate([[l[i], u[i]], np.linspace(l[i], u[i], samples)]))
        if l[i] < 0 < u[i]:
            zs = np.append(zs, 0.0)
        for z in zs:
            f = exact_phi(phi, float(z))
            zz = mpmath.mpf(float(z))
            lo = mpmath.mpf(rel.lower_slope[0, i]) * zz + mpmath.mpf(rel.lower_icpt[0, i])
            hi = mpmath.mpf(rel.upper_slope[0, i]) * zz + mpmath.mpf(rel.upper_icpt[0, i])
            assert lo <= f <= hi, (phi, l[i], u[i], z, lo, f, hi)
            assert mpmath.mpf(rel.post_lo[0, i]) <= f <= mpmath.mpf(rel.post_hi[0, i])
            if rel.alpha_mask[0, i]:
                for a in (rel.alpha_min, rel.alpha_max, 0.5 * (rel.alpha_min + rel.alpha_max)):
                    assert mpmath.mpf(a) * zz <= f


@pytest.mark.parametrize("phi", ACTS, ids=lambda a: f"{a.name}{a.param}")
def test_relaxations_sound_on_fixed_intervals(phi):
    rng = np.random.default_rng(0)
    a = rng.normal(scale=3.0, size=30)
    b = a + np.abs(rng.normal(scale=2.0, size=30))
    # degenerate, tiny, huge, one-sided and straddling intervals
    a = np.concatenate([a, [0.0, -1e-9, -50.0, 1.0, -3.0, -1.4142135, -2.4]])
    b = np.concatenate([b, [0.0, 1e-9, 50.0, 1.0, -1.0, 1.4142135, 2.5]])
    check(phi, a, b)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(ACTS),
    st.floats(-30, 30, allow_nan=False),
    st.floats(0, 30, allow_nan=False),
)
def test_relaxations_sound_hypothesis(phi, l, w):
    check(phi, np.array([l]), np.array([l + w]), samples=5)


@pytest.mark.parametrize(
    "phi",
    [a for a in ACTS if a.name not in ("relu", "identity")],
    ids=lambda a: f"{a.name}{a.param}",
)
def test_derivative_range_encloses_finite_differences(phi):
    rng = np.random.default_rng(1)
    l = rng.normal(scale=3.0, size=40)
    u = l + np.abs(rng.normal(scale=2.0, size=40))
    lo, hi = derivative_range(phi, l, u)
    for i in range(l.size):
        for z in np.linspace(l[i], u[i], 7):
            if phi.name in ("leaky_relu", "elu") and abs(z) < 1e-9:
                continue  # a kink: subgradients, covered by the relaxation test
            t, h = mpmath.mpf(float(z)), mpmath.mpf(10) ** -25
            d = (exact_phi(phi, t + h) - exact_phi(phi, t - h)) / (2 * h)
            assert lo[i] - 1e-9 <= d <= hi[i] + 1e-9, (phi, l[i], u[i], z)
