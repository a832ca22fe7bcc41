"""Adversarial soundness audit: certificates vs a naive dense LMI, bounds vs ground truth.

* ``certify_rho(T)`` must equal the smallest rho that makes the densely built
  M(rho, T) = [A;B]^T Q [A;B] + blkdiag(-rho I, 0, .., W_L^T W_L) negative semidefinite
  (bisection on ``numpy.linalg.eigvalsh``), to ~1e-8 relative, and never lie below it.
* Every bound method's value must be >= a strong empirical lower bound (two-point ratios
  refined by power iteration, and the exact max slope on a fine grid for 1-D inputs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdp.bounds import compute_bound
from sdp.bounds.lipsdp import pairwise_bounds
from sdp.bounds.lower import empirical_lower_bound
from sdp.bounds.naive import activation_lipschitz, naive_bound
from sdp.certificate import (
    Certificate,
    Lmi,
    certify_multipliers,
    certify_rho,
    layerwise_multipliers,
    verify_certificate,
)
from sdp.errors import CertificateError
from sdp.ir import Activation, Dense, Network, Residual
from sdp.radius import certified_radius

ACTS: list[tuple[str, float]] = [
    ("relu", 0.0),
    ("leaky_relu", 0.1),
    ("leaky_relu", -0.5),
    ("leaky_relu", 3.0),
    ("tanh", 0.0),
    ("sigmoid", 0.0),
    ("elu", 1.0),
    ("elu", 2.5),
    ("softplus", 0.0),
    ("gelu", 0.0),
    ("silu", 0.0),
    ("identity", 0.0),
]


# ------------------------------------------------------------------ dense LMI reference


def dense_m(lmi: Lmi, t: tuple[np.ndarray, ...], rho: float) -> np.ndarray:
    """M(rho, T) built naively from A, B and the 2x2 block quadratic form (design.md §3.2)."""
    w, L = lmi.weights, lmi.depth
    n0, hs = lmi.input_size, lmi.hidden_sizes
    n = sum(hs)
    a_mat = np.zeros((n, n0 + n))
    r = c = 0
    for i in range(L):
        a_mat[r : r + hs[i], c : c + w[i].shape[1]] = w[i]
        r, c = r + hs[i], c + w[i].shape[1]
    b_mat = np.hstack([np.zeros((n, n0)), np.eye(n)])
    al = np.concatenate(lmi.alpha) if L else np.zeros(0)
    be = np.concatenate(lmi.beta) if L else np.zeros(0)
    tt = np.diag(np.concatenate(t)) if L else np.zeros((0, 0))
    q = np.block(
        [[-2 * np.diag(al * be) @ tt, np.diag(al + be) @ tt], [np.diag(al + be) @ tt, -2 * tt]]
    )
    ab = np.vstack([a_mat, b_mat])
    m = ab.T @ q @ ab
    m[:n0, :n0] -= rho * np.eye(n0)
    n_last = w[L].shape[1]
    m[m.shape[0] - n_last :, m.shape[0] - n_last :] += w[L].T @ w[L]
    return m


def dense_rho(lmi: Lmi, t: tuple[np.ndarray, ...]) -> float:
    """Smallest rho with lambda_max(M(rho, T)) <= 0 by bisection (M is affine in rho)."""

    def nsd(rho: float) -> bool:
        return bool(np.linalg.eigvalsh(dense_m(lmi, t, rho)).max() <= 0)

    lo, hi = 0.0, 1.0
    while not nsd(hi):
        lo, hi = hi, 2 * hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if nsd(mid) else (mid, hi)
    return hi


def random_lmi(rng: np.random.Generator, scale: float = 1.0) -> Lmi:
    depth = int(rng.integers(0, 4))
    sizes = [int(rng.integers(1, 5)) for _ in range(depth + 2)]
    ws = [scale * rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(depth + 1)]
    al, be = [], []
    for i in range(depth):
        a = rng.uniform(-0.6, 1.2, sizes[i + 1])
        b = a + rng.uniform(0.0, 1.5, sizes[i + 1]) * (rng.uniform(size=sizes[i + 1]) > 0.2)
        al.append(a)  # some neurons linear (a == b), some with negative slopes
        be.append(b)
    return Lmi(tuple(ws), tuple(al), tuple(be))


@pytest.mark.parametrize("seed", range(24))
def test_certify_rho_is_the_dense_lmi_optimum_for_fixed_t(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lmi = random_lmi(rng)
    t = tuple(ti * rng.uniform(1.0, 3.0, ti.shape) for ti in layerwise_multipliers(lmi))
    try:
        rho = certify_rho(lmi, t)
    except CertificateError:  # legitimate only if the dense hidden block is not < 0
        n0 = lmi.input_size
        hidden = dense_m(lmi, t, 0.0)[n0:, n0:]
        assert np.linalg.eigvalsh(hidden).max() > -1e-9 * np.abs(hidden).max()
        t = layerwise_multipliers(lmi)
        rho = certify_rho(lmi, t)
    ref = dense_rho(lmi, t)
    assert ref * (1 - 1e-12) <= rho <= ref * (1 + 1e-7) + 1e-300
    assert verify_certificate(lmi, Certificate(rho, t))
    assert not verify_certificate(lmi, Certificate(ref * (1 - 1e-6), t))
    # the dense M really is NSD at the certified rho
    assert np.linalg.eigvalsh(dense_m(lmi, t, rho)).max() <= 1e-9 * max(rho, 1.0)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_certify_rho_extreme_weight_scales_never_below_dense(scale: float) -> None:
    rng = np.random.default_rng(7)
    ws = [scale * rng.standard_normal(s) for s in ((4, 3), (4, 4), (2, 4))]
    al = (np.array([-0.1, 0.0, 0.2, 1.0]), np.zeros(4))
    be = (np.array([1.1, 1.0, 0.2, 1.0]), np.ones(4))
    lmi = Lmi(tuple(ws), al, be)
    t = layerwise_multipliers(lmi)
    rho = certify_rho(lmi, t)
    # float64 eigvalsh of the dense M is too inexact here; the exact Schur complement in
    # 60-digit arithmetic: rho* = lambda_max(M00 - M0h Mhh^{-1} Mh0) (with rho = 0 in M00)
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    m0 = mp.matrix(dense_m(lmi, t, 0.0).tolist())
    n0 = lmi.input_size
    mhh, m0h, m00 = m0[n0:, n0:], m0[:n0, n0:], m0[:n0, :n0]
    assert max(mp.eigsy(mhh)[0]) < 0
    exact = float(max(mp.eigsy(m00 - m0h * mp.inverse(mhh) * m0h.T)[0]))
    assert exact <= rho <= exact * 1.2  # loose only by the absolute float shift
    assert verify_certificate(lmi, Certificate(rho, t))
    assert not verify_certificate(lmi, Certificate(exact * (1 - 1e-6), t))


def test_margin_scaling_and_zero_multipliers() -> None:
    rng = np.random.default_rng(3)
    lmi = random_lmi(rng)
    while lmi.depth == 0:
        lmi = random_lmi(rng)
    t = layerwise_multipliers(lmi)
    ref = dense_rho(lmi, t)
    loose = certify_rho(lmi, t, rel_margin=1e-3)
    assert ref * (1 + 1e-3) * (1 - 1e-9) <= loose <= ref * (1 + 2e-3)
    # a zero multiplier on a neuron that reaches the output cannot certify: error, never a value
    ws = (rng.standard_normal((4, 3)), rng.standard_normal((2, 4)))
    relu = Lmi(ws, (np.zeros(4),), (np.ones(4),))
    with pytest.raises(CertificateError):
        certify_rho(relu, (np.array([0.0, 1.0, 1.0, 1.0]) * 50,))
    rep = certify_multipliers(relu, (np.array([0.0, 1.0, 1.0, 1.0]) * 50,))
    assert rep.rho >= dense_rho(relu, rep.multipliers) * (1 - 1e-12)


def test_pure_linear_network_is_its_spectral_norm() -> None:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((5, 7))
    rho = certify_rho(Lmi((w,), (), ()), ())
    s2 = np.linalg.svd(w, compute_uv=False)[0] ** 2
    assert s2 <= rho <= s2 * (1 + 1e-8)


# ------------------------------------------------------------------ ground truth


def build(rng: np.random.Generator, sizes: list[int], acts: list[tuple[str, float]]) -> Network:
    ops: list = []
    for i in range(len(sizes) - 1):
        w = (
            rng.standard_normal((sizes[i + 1], sizes[i]))
            * rng.uniform(0.5, 1.5)
            / math.sqrt(sizes[i])
        )
        ops.append(Dense(w, 0.3 * rng.standard_normal(sizes[i + 1])))
        if i < len(sizes) - 2:
            name, p = acts[i]
            ops.append(Activation(name, p))  # type: ignore[arg-type]
    return Network((sizes[0],), tuple(ops))


def strong_lower_bound(net: Network, seed: int = 0) -> float:
    """Max two-point ratio: power-iteration starts at two scales, plus a grid for 1-D inputs."""
    best = max(
        empirical_lower_bound(net, starts=32, iters=12, refine_steps=10, scale=s, seed=seed)
        for s in (0.5, 3.0)
    )
    if net.input_size == 1:
        x = np.linspace(-8, 8, 40001)[:, None]
        y = net.forward(x)
        best = max(
            best, float((np.linalg.norm(np.diff(y, axis=0), axis=1) / (x[1, 0] - x[0, 0])).max())
        )
    return best


def _net_cases() -> list[tuple[int, int]]:
    return [(seed, depth) for seed in range(10) for depth in (1, 2, 3, 5)]


@pytest.mark.parametrize(("seed", "depth"), _net_cases())
def test_every_method_is_above_the_empirical_lower_bound(seed: int, depth: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n0 = 1 if seed % 3 == 0 else int(rng.integers(2, 5))
    sizes = [n0, *[int(rng.integers(2, 6)) for _ in range(depth - 1)], int(rng.integers(1, 4))]
    acts = [ACTS[int(i)] for i in rng.integers(0, len(ACTS), depth - 1)]
    net = build(rng, sizes, acts)
    low = strong_lower_bound(net, seed)
    methods = ["naive", "auto"] + (["lipsdp-neuron", "lipsdp-layer"] if depth <= 3 else [])
    for m in methods:
        res = compute_bound(net, m, lower_bound=False)
        assert res.verified
        assert res.value >= low * (1 - 1e-9), (m, res.value, low, acts)


@pytest.mark.parametrize(
    "act", [("elu", 2.5), ("leaky_relu", 3.0), ("leaky_relu", -2.0), ("gelu", 0.0), ("silu", 0.0)]
)
def test_compositional_residual_bound_uses_max_abs_slope(act: tuple[str, float]) -> None:
    rng = np.random.default_rng(5)
    phi = Activation(*act)  # type: ignore[arg-type]
    a, b = phi.slope_bounds
    assert activation_lipschitz(phi) == max(abs(a), abs(b)) >= 1.0
    blk = Residual(
        (
            Dense(rng.standard_normal((3, 3)), rng.standard_normal(3)),
            phi,
            Dense(rng.standard_normal((3, 3)), np.zeros(3)),
        ),
    )
    net = Network(
        (3,),
        (
            Dense(np.eye(3), np.zeros(3)),
            phi,
            blk,
            phi,
            Dense(rng.standard_normal((2, 3)), np.zeros(2)),
        ),
    )
    value, _ = naive_bound(net)
    res = compute_bound(net, "auto", lower_bound=False)
    low = strong_lower_bound(net)
    assert value >= low and res.value >= low


def test_exact_slope_bounds_of_smooth_activations() -> None:
    x = np.linspace(-10, 10, 400001)
    for name in ("gelu", "silu", "elu", "leaky_relu", "softplus", "sigmoid", "tanh"):
        phi = Activation(name, 1.7 if name in ("elu",) else (-0.3 if name == "leaky_relu" else 0.0))  # type: ignore[arg-type]
        y = phi(x)
        s = np.diff(y) / np.diff(x)
        a, b = phi.slope_bounds
        assert a <= s.min() + 1e-10 and s.max() <= b + 1e-10, name


def test_linear_layers_folded_but_certified_on_the_original_network() -> None:
    rng = np.random.default_rng(9)
    net = build(rng, [3, 4, 4, 4, 2], [("identity", 0.0), ("tanh", 0.0), ("leaky_relu", 1.0)])
    res = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    cert = res.certificate
    assert cert is not None and cert.meta.get("folded_linear_layers") == 2
    lmi = Lmi.from_chain(net.chain())
    assert len(cert.multipliers) == lmi.depth == 3
    assert verify_certificate(lmi, cert)
    assert res.value >= strong_lower_bound(net)
    # a purely linear network: the folded bound is its spectral norm (up to the lift)
    lin = build(rng, [3, 5, 2], [("identity", 0.0)])
    w = lin.chain().weights()
    exact = np.linalg.norm(w[1] @ w[0], 2)
    got = compute_bound(lin, "lipsdp-neuron", lower_bound=False).value
    assert exact * (1 - 1e-12) <= got <= exact * 1.01


# ------------------------------------------------------------------ pairwise


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_bounds_are_above_the_pairwise_lipschitz_constants(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    net = build(rng, [2, 5, 4, 3], [("relu", 0.0), ("tanh", 0.0)])
    mat, certs, _ = pairwise_bounds(net, "neuron")
    k = net.output_size
    full = compute_bound(net, "lipsdp-neuron", lower_bound=False).value
    for y in range(k):
        for j in range(y + 1, k):
            row = np.zeros((1, k))
            row[0, y], row[0, j] = 1.0, -1.0
            ops = (*net.ops, Dense(row, np.zeros(1)))
            diff_net = Network(net.input_shape, ops)
            assert mat[y, j] >= strong_lower_bound(diff_net, seed) * (1 - 1e-9)
            assert mat[y, j] <= math.sqrt(2) * full * (1 + 1e-6) + 1e-9
    for c in certs:
        lmi = Lmi.from_chain(net.chain(), output_map=c.output_map)
        assert verify_certificate(lmi, c)


def test_radius_pairwise_formula_has_no_sqrt2() -> None:
    logits = np.array([[3.0, 1.0, 0.5]])
    pw = np.array([[0.0, 2.0, 5.0], [2.0, 0.0, 1.0], [5.0, 1.0, 0.0]])
    out = certified_radius(logits, 1.0, pairwise=pw)
    assert out.radius[0] == pytest.approx(2.0 / math.sqrt(2))
    assert out.radius_pairwise is not None
    assert out.radius_pairwise[0] == pytest.approx(min(2.0 / 2.0, 2.5 / 5.0))


# ------------------------------------------------------------------ conv norm bounds


def test_conv_norm_bounds_are_upper_bounds_of_the_exact_norm() -> None:
    """Circulant (FFT) and Holder bounds >= exact SVD for padded/strided/dilated/grouped convs."""
    from sdp.bounds.naive import conv_circulant_bound, conv_holder_bound
    from sdp.ir import Conv2d

    rng = np.random.default_rng(0)
    checked = 0
    while checked < 60:
        g, cig, cog = int(rng.choice([1, 2])), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        h, w = (int(v) for v in rng.integers(3, 8, 2))
        pad = tuple(int(v) for v in rng.integers(0, 3, 4))
        stride = tuple(int(v) for v in rng.integers(1, 3, 2))
        dil = tuple(int(v) for v in rng.integers(1, 3, 2))
        try:
            conv = Conv2d(
                rng.standard_normal((cog * g, cig, kh, kw)),
                np.zeros(cog * g),
                (cig * g, h, w),
                stride,  # type: ignore[arg-type]
                pad,  # type: ignore[arg-type]
                dil,  # type: ignore[arg-type]
                g,
            )
        except ValueError:
            continue
        exact = np.linalg.svd(conv.matrix(), compute_uv=False)[0]
        assert exact <= conv_circulant_bound(conv) * (1 + 1e-12)
        assert exact <= conv_holder_bound(conv) * (1 + 1e-12)
        checked += 1


# ------------------------------------------------------------------ attacks inside the radius


def _mnist_images(fixtures_dir, count: int) -> np.ndarray:
    import gzip

    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16)
    return raw.reshape(-1, 784)[:count].astype(np.float64) / 255.0


def _pgd_min_margin(net: Network, x: np.ndarray, y: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """l2 PGD inside ||d|| <= radius minimising f_y - max_{j != y} f_j; the smallest margin seen."""
    from sdp.bounds.lower import vector_jacobian

    rng = np.random.default_rng(0)
    rows = np.arange(len(x))
    best = np.full(len(x), np.inf)
    for start in range(3):
        d = rng.standard_normal(x.shape) if start else np.zeros_like(x)
        d *= (radius / np.maximum(np.linalg.norm(d, axis=1), 1e-300))[:, None]
        for _ in range(25):
            f = net.forward(x + d)
            other = f.copy()
            other[rows, y] = -np.inf
            j = other.argmax(axis=1)
            best = np.minimum(best, f[rows, y] - f[rows, j])
            u = np.zeros_like(f)
            u[rows, y], u[rows, j] = 1.0, -1.0
            g = vector_jacobian(net, x + d, u)
            g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
            d = d - 0.25 * radius[:, None] * g
            d *= np.minimum(1.0, radius / np.maximum(np.linalg.norm(d, axis=1), 1e-300))[:, None]
        f = net.forward(x + d)
        other = f.copy()
        other[rows, y] = -np.inf
        best = np.minimum(best, f[rows, y] - other.max(axis=1))
    return best


def test_pgd_inside_certified_radii_never_flips_mnist(fixtures_dir) -> None:
    """mnist 784-50-10 (LipSDP-Neuron, global and pairwise radii) and mnistfc-256x2 (naive)."""
    from sdp.importers import load_model_file
    from sdp.rounding import logit_error_bound, unit_roundoff

    x = _mnist_images(fixtures_dir, 40)
    cases = [
        (load_model_file(fixtures_dir / "lipsdp" / "mnist_weights.mat"), "lipsdp-neuron", True),
        (
            load_model_file(
                fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
            ),
            "naive",
            False,
        ),
    ]
    for net, method, pairwise in cases:
        res = compute_bound(net, method, pairwise=pairwise, lower_bound=False)
        err = logit_error_bound(net, unit_roundoff("float64"), safety=4.0)(x)
        out = certified_radius(net.forward(x), res.value, pairwise=res.pairwise, logit_error=err)
        r = out.best_radius
        assert (r > 0).mean() > 0.5
        worst = _pgd_min_margin(net, x, out.prediction, r * (1 - 1e-9))
        assert (worst > 0).all(), (method, worst.min())
        # and the attack is real: at 3x the radius (global bound) it gets much closer
        if not pairwise:
            assert (_pgd_min_margin(net, x, out.prediction, 3 * r) < out.margin).all()


def test_compute_bound_refuses_a_bound_below_the_measured_ratio(monkeypatch) -> None:
    """Safety net: a (buggy) method value under an observed two-point ratio is never reported."""
    from dataclasses import replace

    import sdp.bounds.compute as compute
    from sdp.errors import LipcertError

    real = compute._naive

    def too_small(net: Network):  # a deliberately wrong method
        res = real(net)
        return replace(res, value=0.5 * res.value)

    monkeypatch.setattr(compute, "_naive", too_small)
    lin = build(np.random.default_rng(1), [3, 2], [])  # linear: the measured ratio is ~exact
    with pytest.raises(LipcertError) as exc:
        compute.compute_bound(lin, "naive")
    assert exc.value.code == "bound-below-lower-bound"


def test_zero_width_hidden_layers_certify_instead_of_crashing() -> None:
    rng = np.random.default_rng(0)
    cases = [
        Lmi((np.zeros((0, 3)), np.zeros((2, 0))), (np.zeros(0),), (np.ones(0),)),
        Lmi(
            (rng.standard_normal((3, 3)), np.zeros((0, 3)), np.zeros((2, 0))),
            (np.zeros(3), np.zeros(0)),
            (np.ones(3), np.ones(0)),
        ),
    ]
    for lmi in cases:  # the network is constant: any rho >= 0 is valid
        t = layerwise_multipliers(lmi)
        rho = certify_rho(lmi, t)
        assert 0 <= rho < 1e-6
        assert verify_certificate(lmi, Certificate(rho, t))


@pytest.mark.parametrize(
    "act",
    [("elu", 2.5), ("leaky_relu", 3.0), ("leaky_relu", -2.0), ("gelu", 0.0), ("sigmoid", 0.0)],
)
def test_leading_and_trailing_activations_are_bounded(act: tuple[str, float]) -> None:
    """phi first (identity layer inserted before it) and phi last (identity output layer)."""
    rng = np.random.default_rng(13)
    phi = Activation(*act)  # type: ignore[arg-type]
    net = Network(
        (2,),
        (
            phi,
            Dense(rng.standard_normal((4, 2)), rng.standard_normal(4)),
            phi,
            Dense(rng.standard_normal((3, 4)), rng.standard_normal(3)),
            phi,
        ),
    )
    low = strong_lower_bound(net)
    for m in ("naive", "lipsdp-neuron", "lipsdp-layer", "auto"):
        assert compute_bound(net, m, lower_bound=False).value >= low * (1 - 1e-9), m


def test_onnx_input_normalisation_is_folded_into_the_bound(tmp_path) -> None:
    """Sub mean / Div std before Gemm: the bound covers the 1/std amplification (x in raw units)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sdp.importers import load_model

    rng = np.random.default_rng(3)
    std = np.array([0.05, 1.0, 2.0, 0.5], np.float32)
    w1 = rng.standard_normal((5, 4)).astype(np.float32)
    w2 = rng.standard_normal((3, 5)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3, 0.4], np.float32), "mean"),
        numpy_helper.from_array(std, "std"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(5, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["c"]),
        helper.make_node("Div", ["c", "std"], ["n"]),
        helper.make_node("Gemm", ["n", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    net = load_model(model.SerializeToString())
    x = rng.standard_normal((1, 4))
    ref = w2.astype(float) @ np.maximum(w1.astype(float) @ ((x[0] - [0.1, 0.2, 0.3, 0.4]) / std), 0)
    np.testing.assert_allclose(net.forward(x)[0], ref, rtol=1e-5, atol=1e-5)
    low = strong_lower_bound(net)
    assert low > 10  # the 1/0.05 scaling is really there
    for m in ("naive", "lipsdp-neuron", "auto"):
        assert compute_bound(net, m, lower_bound=False).value >= low * (1 - 1e-9), m
    assert onnx is not None
