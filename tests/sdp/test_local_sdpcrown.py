"""SDP-CROWN (sdp.local.sdp_crown): exact offsets, rigorous re-check, attacks, certificates."""

from __future__ import annotations

import gzip
import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from sdp.errors import NotApplicable
from sdp.importers import load_model_file
from sdp.ir import Activation, Dense, Network
from sdp.local import LocalCertificate, certify_local, verify_local
from sdp.local import sdp_crown as S
from sdp.local._ereal import EReal
from tests.sdp._local_nets import dense_net
from tests.sdp.test_local_attack import pgd_min_margin


def _exact_piece_min(lam, g, q, lo, hi, c, sneg) -> Fraction:
    """min over lo <= t <= hi of lam phi(t) - g t + q (t - c)^2, in rationals."""
    lam, g, q, lo, hi, c, sneg = map(Fraction, (lam, g, q, lo, hi, c, sneg))

    def f(t: Fraction) -> Fraction:
        phi = t if t >= 0 else sneg * t
        return lam * phi - g * t + q * (t - c) ** 2

    cands = [lo, hi] + ([Fraction(0)] if lo < 0 < hi else [])
    for p, r, s in ((lo, min(hi, Fraction(0)), sneg), (max(lo, Fraction(0)), hi, Fraction(1))):
        if p <= r and q > 0:
            v = c - (lam * s - g) / (2 * q)
            if p <= v <= r:
                cands.append(v)
    return min(f(t) for t in cands)


def _random_neurons(rng: np.random.Generator, n: int):
    lo = rng.normal(size=n) * 2
    hi = lo + np.abs(rng.normal(size=n)) * 3
    hi[:3] = lo[:3]  # degenerate intervals
    lo[3:6] = np.abs(lo[3:6])  # stably active
    hi[3:6] = lo[3:6] + 1.0
    hi[6:9] = -np.abs(hi[6:9]) - 0.1  # stably inactive
    lo[6:9] = hi[6:9] - 1.0
    c = lo + (hi - lo) * rng.uniform(-0.2, 1.2, size=n)
    lam_ = rng.normal(size=(3, n)) * 2
    g = lam_ * rng.uniform(-0.5, 1.5, size=(3, n))
    q = np.abs(rng.normal(size=(3, n))) * rng.choice([0.0, 1e-3, 1.0, 50.0], size=(3, n))
    return lam_, g, q, lo, hi, c


@pytest.mark.parametrize("sneg", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("rel_err", [0.0, 1e-6])
def test_offsets_lower_vs_exact_rational(sneg, rel_err):
    rng = np.random.default_rng(7 + int(10 * sneg))
    lam_, g, q, lo, hi, c = _random_neurons(rng, 40)
    geo = S.Geometry(lo, hi, c, np.zeros_like(c))
    err = np.abs(lam_) * rel_err * rng.uniform(size=lam_.shape)  # Lam known to +-err only
    got = S.offsets_lower(EReal(lam_, err), g, q, geo, sneg)
    for r in range(3):
        for i in range(40):
            # m is concave in Lam, so its minimum over the interval is at an end point
            exact = min(
                _exact_piece_min(
                    Fraction(lam_[r, i]) + s * Fraction(err[r, i]),
                    g[r, i],
                    q[r, i],
                    lo[i],
                    hi[i],
                    c[i],
                    sneg,
                )
                for s in (-1, 1)
            )
            assert Fraction(got[r, i]) <= exact, (r, i)
            tol = 1e-9 if rel_err == 0 else 1e-4
            assert float(exact) - got[r, i] <= tol * (1 + abs(float(exact)))


def _exact_bound(layers, geos, x0, eps, top, const, cand) -> mpmath.mpf:
    """The bound formula of certify in rationals / 60-digit arithmetic for the same floats."""
    mpmath.mp.dps = 60
    lam_ = [[Fraction(v) for v in row] for row in top]
    total = [Fraction(v) for v in const]
    rows = len(total)
    for k in range(len(geos) - 1, -1, -1):
        geo, lay = geos[k], layers[k]
        q = cand.lam[k][:, None] * geo.weight * (1 - 8 * S.U)
        g = cand.g[k]
        for r in range(rows):
            m = sum(
                _exact_piece_min(
                    lam_[r][i], g[r, i], q[r, i], geo.lo[i], geo.hi[i], geo.centre[i], lay.sneg
                )
                for i in range(len(geo.lo))
            )
            total[r] += m - Fraction(cand.lam[k][r]) * Fraction(geo.tau)
            total[r] += sum(Fraction(g[r, i]) * Fraction(lay.b[i]) for i in range(len(lay.b)))
        w = [[Fraction(v) for v in row] for row in lay.w]
        lam_ = [
            [sum(Fraction(g[r, i]) * w[i][j] for i in range(len(w))) for j in range(len(w[0]))]
            for r in range(rows)
        ]
    out = []
    for r in range(rows):
        lin = sum(lam_[r][j] * Fraction(x0[j]) for j in range(len(x0)))
        sq = sum(v * v for v in lam_[r])
        val = mpmath.mpf(total[r].numerator) / total[r].denominator
        val += mpmath.mpf(lin.numerator) / lin.denominator
        val -= mpmath.mpf(eps) * mpmath.sqrt(mpmath.mpf(sq.numerator) / sq.denominator)
        out.append(val)
    return out


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_certify_below_exact_recomputation(name):
    rng = np.random.default_rng(3)
    net = dense_net(rng, [4, 6, 5, 3], name, scale=1.5)
    layers = S.layers_of(net)
    x0 = rng.normal(size=4)
    eps = 0.4
    geos = S.geometry(layers, x0, eps, iters=10)
    out = layers[-1]
    top = out.w[0][None] - out.w[1:]
    const = out.b[0] - out.b[1:]
    cand = S.optimise(layers[:-1], geos, x0, eps, top, const, iters=10)
    got = S.certify(layers[:-1], geos, x0, eps, EReal.exact(top), EReal.exact(const), cand)
    exact = _exact_bound(layers[:-1], geos, x0, eps, top, const, cand)
    for r in range(len(got)):
        assert mpmath.mpf(got[r]) <= exact[r]
        assert float(exact[r]) - got[r] < 1e-9 * (1 + abs(float(exact[r])))
    assert any(lam.max() > 0 for lam in cand.lam)  # the coupling was used


def _disc_min_margin(net: Network, x0: np.ndarray, eps: float, y: int) -> np.ndarray:
    r = eps * np.sqrt(np.linspace(0, 1, 120))[:, None, None]
    th = np.linspace(0, 2 * np.pi, 720, endpoint=False)[None, :, None]
    pts = (x0 + r * np.concatenate([np.cos(th), np.sin(th)], axis=-1)).reshape(-1, 2)
    f = net.forward(pts)
    d = np.asarray(f[:, [y]] - f)
    d[:, y] = np.inf
    return d


@pytest.mark.parametrize(("name", "depth"), [("relu", 1), ("relu", 3), ("leaky_relu", 2)])
def test_bound_below_dense_sampling_2d(name, depth):
    """On a 2-D input the true minimum over the disc is approximated from above by a grid;
    every rigorous lower bound must be below it."""
    rng = np.random.default_rng(11 + depth)
    net = dense_net(rng, [2] + [12] * depth + [3], name, scale=2.0)
    layers = S.layers_of(net)
    for trial in range(3):
        x0 = rng.normal(size=2)
        y = int(np.argmax(net.forward(x0[None])[0]))
        eps = [0.05, 0.3, 1.0][trial]
        lower, _ = S.margin_lower_bounds(layers, x0, eps, y, iters=20, inter_iters=10)
        sampled = _disc_min_margin(net, x0, eps, y).min(axis=0)
        assert np.all(lower <= sampled + 1e-12), (lower, sampled)


def test_consecutive_affine_layers_kept_exact():
    rng = np.random.default_rng(5)
    w1, w2 = rng.normal(size=(5, 2)), rng.normal(size=(4, 5))
    net = Network(
        (2,),
        (
            Dense(w1, rng.normal(size=5)),
            Dense(w2, rng.normal(size=4)),
            Activation("relu"),
            Dense(rng.normal(size=(3, 4)), np.zeros(3)),
            Activation("relu"),
        ),
    )
    layers = S.layers_of(net)
    assert [lay.sneg for lay in layers] == [1.0, 0.0, 0.0, None]
    assert layers[-1].w.shape == (3, 3)  # identity after the trailing relu
    x0 = rng.normal(size=2)
    y = int(np.argmax(net.forward(x0[None])[0]))
    lower, _ = S.margin_lower_bounds(layers, x0, 0.2, y, iters=10, inter_iters=5)
    assert np.all(lower <= _disc_min_margin(net, x0, 0.2, y).min(axis=0) + 1e-12)


def test_sdp_crown_at_least_crown_and_better_somewhere():
    rng = np.random.default_rng(21)
    net = dense_net(rng, [10, 32, 32, 4], "relu", scale=1.5)
    x = rng.normal(size=(6, 10))
    crown = certify_local(net, x, epsilon=0.0, method="crown")  # predictions only
    from sdp.local.graph import build_graph
    from sdp.local.margins import get_method

    graph = build_graph(net)
    eps = np.full(6, 0.25)
    lc = get_method("crown").compute(graph, x, eps, crown.prediction).lower
    ls = get_method("sdp-crown").compute(graph, x, eps, crown.prediction).lower
    finite = np.isfinite(lc)
    assert np.all(ls[finite] >= lc[finite])
    assert np.any(ls[finite] > lc[finite] + 1e-3)


@pytest.mark.parametrize(("name", "depth"), [("relu", 1), ("relu", 3), ("leaky_relu", 2)])
def test_pgd_inside_certified_eps_random(name, depth):
    rng = np.random.default_rng(40 + depth)
    net = dense_net(rng, [8] + [16] * depth + [4], name, scale=1.5)
    x = rng.normal(size=(4, 8))
    for eps in (0.1, 0.4):
        res = certify_local(net, x, epsilon=eps, method="sdp-crown")
        ok = np.flatnonzero(res.certified)
        if ok.size:
            m = pgd_min_margin(net, x[ok], res.prediction[ok], np.full(ok.size, eps))
            assert np.all(m > 0)
            assert all(verify_local(net, x[i], res.certificates[i]) for i in ok[:2])


def _mnist(fixtures_dir, n):
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16, count=784 * n)
    return raw.reshape(n, 784) / 255.0


def test_mnistfc_certified_is_not_attackable(fixtures_dir):
    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path)
    x = _mnist(fixtures_dir, 2)
    res = certify_local(net, x, epsilon=0.3, method="sdp-crown")
    ok = np.flatnonzero(res.certified)
    assert ok.size >= 1
    m = pgd_min_margin(net, x[ok], res.prediction[ok], np.full(ok.size, 0.3))
    assert np.all(m > 0)
    i = int(ok[0])
    cert = res.certificates[i]
    assert cert.method == "sdp-crown" and verify_local(net, x[i], cert)


def _tampered(cert: LocalCertificate, **kw) -> LocalCertificate:
    fields = dict(cert.__dict__)
    fields.update(kw)
    return LocalCertificate(**fields)


def test_verify_rejects_tampered_payloads():
    rng = np.random.default_rng(8)
    net = dense_net(rng, [6, 12, 12, 3], "relu")
    x = rng.normal(size=(4, 6))
    res = certify_local(net, x, epsilon=0.05, method="sdp-crown")
    i = int(np.flatnonzero(res.certified)[0])
    cert = res.certificates[i]
    assert verify_local(net, x[i], cert)
    pay = list(cert.payload)
    key, arr = pay[-1]
    bad = [
        tuple(pay[:-1]),  # missing entry
        tuple([*pay, ("junk", np.zeros(1))]),  # unknown entry
        tuple([*pay[:-1], (key, np.full_like(arr, -1.0) if "lam" in key else arr[:, :1])]),
    ]
    for p in bad:
        assert not verify_local(net, x[i], _tampered(cert, payload=p))
    assert not verify_local(net, x[i], _tampered(cert, epsilon=100.0))


def test_not_applicable_and_auto_skips():
    rng = np.random.default_rng(9)
    net = dense_net(rng, [4, 8, 3], "sigmoid")
    x = rng.normal(size=(2, 4))
    with pytest.raises(NotApplicable):
        certify_local(net, x, epsilon=0.1, method="sdp-crown")
    res = certify_local(net, x, epsilon=0.1, method="auto")
    assert "sdp-crown" not in res.radius_method
    assert math.isfinite(float(res.margin[0]))
