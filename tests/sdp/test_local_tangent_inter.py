"""Optimised intermediate tangents of sigmoid / tanh nets (alpha-CROWN's intermediate bounds,
issue 12): every tightened pre-activation bound holds at 60-digit points and against a
gradient attack on that neuron; certificates replay; forged payloads cannot certify more."""

from __future__ import annotations

from dataclasses import replace

import mpmath
import numpy as np
import pytest

from sdp.ir import Activation, Dense, Network
from sdp.local import certify_local, verify_local
from sdp.local.alpha import IntermediateAlpha, tangent_rule
from sdp.local.graph import build_graph
from sdp.local.margins import objective_rows
from sdp.local.propagate import backward, compute_bounds
from tests.sdp._local_nets import dense_net, mp_phi
from tests.sdp.test_local_attack import check_no_attack

mpmath.mp.dps = 60


def _layers(net: Network) -> list[Dense]:
    return [op for op in net.ops if isinstance(op, Dense)]


def _pre_activations(net: Network, x: np.ndarray) -> list[np.ndarray]:
    """Float pre-activations of every dense layer at the points x (P, n0)."""
    phi = next(op for op in net.ops if isinstance(op, Activation))
    out, h = [], x
    for i, d in enumerate(_layers(net)):
        z = h @ d.weight.T + d.bias
        out.append(z)
        if i < len(_layers(net)) - 1:
            h = phi(z)
    return out


def _attack(net: Network, x0: np.ndarray, eps: float, k: int, sign: np.ndarray) -> np.ndarray:
    """Points of the ball (n_k, n0) that push sign_i z_{k,i} down, one row per neuron i:
    projected gradient descent with the gradient back-propagated by hand."""
    phi = next(op for op in net.ops if isinstance(op, Activation))
    ds = _layers(net)[: k + 1]
    n = ds[-1].weight.shape[0]
    rng = np.random.default_rng(k)
    x = x0 + rng.normal(size=(n, x0.size)) * eps / np.sqrt(x0.size)
    for _ in range(60):
        hs, zs, h = [x], [], x
        for i, d in enumerate(ds):
            z = h @ d.weight.T + d.bias
            zs.append(z)
            h = phi(z) if i < k else z
            hs.append(h)
        g = np.zeros((n, n))
        g[np.arange(n), np.arange(n)] = sign  # d (sign_i z_{k,i}) / d z_k, per row
        for i in range(k, -1, -1):
            if i < k:
                s = 1.0 / (1.0 + np.exp(-zs[i]))
                g = g * (s * (1 - s) if phi.name == "sigmoid" else 1 - np.tanh(zs[i]) ** 2)
            g = g @ ds[i].weight
        x = x - 0.2 * eps * g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-30)
        dx = x - x0
        x = x0 + dx * np.minimum(1.0, eps / np.maximum(np.linalg.norm(dx, axis=1), 1e-30))[:, None]
    return x


def _mp_pre(net: Network, x: np.ndarray) -> list[list]:
    phi = next(op for op in net.ops if isinstance(op, Activation))
    h = [mpmath.mpf(float(v)) for v in x]
    out = []
    for d in _layers(net):
        z = [
            mpmath.fsum(mpmath.mpf(float(d.weight[r, j])) * h[j] for j in range(len(h)))
            + mpmath.mpf(float(d.bias[r]))
            for r in range(d.weight.shape[0])
        ]
        out.append(z)
        h = [mp_phi(phi, v) for v in z]
    return out


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_intermediate_tangents_tighten_and_hold(name):
    rng = np.random.default_rng(31)
    net = dense_net(rng, [6, 10, 10, 10, 3], name, scale=3.0)
    graph = build_graph(net)
    x0 = rng.normal(size=(2, 6))
    eps = np.full(2, 0.5)
    plain = compute_bounds(graph, x0, eps)
    hook = IntermediateAlpha(tangent_iterations=10)
    tight = compute_bounds(graph, x0, eps, node_hook=hook)
    pre = [nd.index for nd in graph.nodes if nd.kind == "affine"][:-1]
    gain = 0.0
    for idx in pre:
        assert np.all(tight.lo[idx] >= plain.lo[idx]) and np.all(tight.hi[idx] <= plain.hi[idx])
        gain = max(
            gain, float(np.max((plain.hi[idx] - plain.lo[idx]) / (tight.hi[idx] - tight.lo[idx])))
        )
    assert gain > 1.05, "the intermediate optimisation never helped: vacuous"
    assert any(hook.found_lines[b] for b in range(2))
    # verification replays the stored slopes to the same bounds, bit for bit
    again = compute_bounds(
        graph, x0, eps, node_hook=IntermediateAlpha(given_lines=hook.found_lines)
    )
    for idx in pre:
        assert np.array_equal(again.lo[idx], tight.lo[idx])
        assert np.array_equal(again.hi[idx], tight.hi[idx])
    for b in range(2):
        # random points of the ball and its sphere, and an attack on every neuron's bounds
        d = rng.normal(size=(400, 6))
        d *= eps[b] * rng.uniform(0, 1, size=(400, 1)) ** 0.1 / np.linalg.norm(d, axis=1)[:, None]
        pts = [x0[b] + d]
        for k in range(len(pre)):
            n = graph.nodes[pre[k]].size
            for sg in (1.0, -1.0):
                pts.append(_attack(net, x0[b], eps[b] * (1 - 1e-9), k, np.full(n, sg)))
        zs = _pre_activations(net, np.concatenate(pts))
        for k, idx in enumerate(pre):
            slack = 1e-9 * (1 + np.abs(zs[k]))
            assert np.all(zs[k] >= tight.lo[idx][b] - slack)
            assert np.all(zs[k] <= tight.hi[idx][b] + slack)
        # exact (60-digit) pre-activations at the attack points closest to the bounds
        allp = np.concatenate(pts)
        for k, idx in enumerate(pre):
            for bound, sg in ((tight.lo[idx][b], 1.0), (tight.hi[idx][b], -1.0)):
                i = int(np.argmin(sg * (zs[k] - bound[None]).min(axis=1)))
                z = _mp_pre(net, allp[i])[k]
                assert all(sg * (z[j] - mpmath.mpf(bound[j])) >= 0 for j in range(len(z)))


@pytest.mark.parametrize("pieces", [1, 2, 8])
def test_tangent_rule_is_sound_for_any_slopes(pieces):
    """Absurd per-row slopes with the rule's rigorous intercepts (any grid) still bound the
    margins below at 60-digit points of the ball."""
    rng = np.random.default_rng(4 + pieces)
    net = dense_net(rng, [5, 6, 6, 3], "sigmoid", scale=2.5)
    graph = build_graph(net)
    x0 = rng.normal(size=(1, 5))
    eps = np.array([0.7])
    stb = compute_bounds(graph, x0, eps)
    pred = np.argmax(net.forward(x0), axis=1)
    c = objective_rows(pred, 3)
    acts = [nd.index for nd in graph.act_nodes()]
    slopes = {k: (rng.uniform(-1, 1.5, (1, 3, 6)), rng.uniform(-1, 1.5, (1, 3, 6))) for k in acts}
    got = backward(
        stb, {graph.output: c}, np.zeros((1, 3)), act_rule=tangent_rule(slopes, pieces)
    ).lower[0]
    assert np.all(np.isfinite(np.delete(got, pred[0])))
    d = rng.normal(size=(6, 5))
    d *= eps[0] / np.linalg.norm(d, axis=1, keepdims=True)
    from tests.sdp.test_local_bounds import mp_forward

    for x in x0[0] + d:
        f = mp_forward(net, x)
        for j in range(3):
            if j != pred[0]:
                assert f[pred[0]] - f[j] >= mpmath.mpf(got[j])


def test_certificates_with_intermediate_tangents_replay_and_resist_forgery():
    rng = np.random.default_rng(8)
    net = dense_net(rng, [10, 14, 14, 14, 4], "sigmoid", scale=3.0)
    x = rng.normal(size=(4, 10))
    res = check_no_attack(net, x, method="alpha-crown")
    inter = [
        (i, c)
        for i, c in enumerate(res.certificates)
        if c.method == "alpha-crown" and any(k.startswith("trows:") for k, _ in c.payload)
    ]
    assert inter, "no certificate used intermediate tangents: vacuous"
    i, cert = inter[0]
    assert verify_local(net, x[i], cert)
    # forged slopes: the intercepts are recomputed, so verification can only get harder
    forged = replace(
        cert, payload=tuple((k, a * 1.7 if k.startswith("tsl:") else a) for k, a in cert.payload)
    )
    if verify_local(net, x[i], forged):
        d = rng.normal(size=(3000, 10))
        d *= cert.epsilon / np.linalg.norm(d, axis=1, keepdims=True)
        assert np.all(np.argmax(net.forward(x[i] + d), axis=1) == cert.prediction)
    # malformed entries are refused, not trusted
    for bad in (
        lambda k, a: a * np.nan if k.startswith("tsl:") else a,
        lambda k, a: a[:-1] if k.startswith("tsl:") else a,
        lambda k, a: a + 1e6 if k.startswith("trows:") else a,
        lambda k, a: a[:-1] if k.startswith("tsm:") else a,  # mask of the wrong size
        lambda k, a: np.full_like(a, 255) if k.startswith("tsm:") else a,  # count != slopes
        lambda k, a: a.astype(np.float64) if k.startswith("tsm:") else a,  # not packed bits
    ):
        broken = replace(cert, payload=tuple((k, bad(k, a)) for k, a in cert.payload))
        assert not verify_local(net, x[i], broken)
    no_slopes = tuple((k, a) for k, a in cert.payload if not k.startswith("tsl:"))
    assert not verify_local(net, x[i], replace(cert, payload=no_slopes))
    # a moved mask bit (one stored slope now on another entry): only ever a sound line
    moved = []
    for k, a in cert.payload:
        if k.startswith("tsm:"):
            bits = np.unpackbits(a)
            on, off = np.flatnonzero(bits), np.flatnonzero(bits == 0)
            if on.size and off.size:
                bits[on[0]], bits[off[0]] = 0, 1
            a = np.packbits(bits)
        moved.append((k, a))
    if verify_local(net, x[i], replace(cert, payload=tuple(moved))):
        d = rng.normal(size=(3000, 10))
        d *= cert.epsilon / np.linalg.norm(d, axis=1, keepdims=True)
        assert np.all(np.argmax(net.forward(x[i] + d), axis=1) == cert.prediction)


def test_intermediate_tangent_payload_is_compact():
    """Only the entries with a slope of their own are stored (float16), the others (the
    relaxation's own line) as one bit: well under half the bytes of dense float32 slopes."""
    rng = np.random.default_rng(8)
    net = dense_net(rng, [10, 14, 14, 14, 4], "sigmoid", scale=3.0)
    x = rng.normal(size=(4, 10))
    res = certify_local(net, x, epsilon=0.3, method="alpha-crown")
    graph = build_graph(net)
    seen = False
    for cert in res.certificates:
        pay = dict(cert.payload)
        for key, vals in pay.items():
            if not key.startswith("tsl:"):
                continue
            seen = True
            _, t, k = key.split(":")
            q, n = pay[f"trows:{t}"].size, graph.nodes[int(k)].size
            mask = pay[f"tsm:{t}:{k}"]
            assert vals.dtype == np.float16 and mask.dtype == np.uint8
            assert int(np.unpackbits(mask).sum()) == vals.size
            assert vals.nbytes + mask.nbytes < 0.55 * 4 * q * n
    assert seen, "no intermediate tangent slopes stored: vacuous"


def test_intermediate_tangents_do_not_depend_on_the_batch():
    rng = np.random.default_rng(12)
    net = dense_net(rng, [7, 9, 9, 9, 3], "tanh", scale=3.0)
    x = rng.normal(size=(3, 7))
    a = certify_local(net, x, epsilon=0.4, method="alpha-crown", batch_size=3)
    assert a.certified is not None
    for i in range(3):
        one = certify_local(net, x[i : i + 1], epsilon=0.4, method="alpha-crown", batch_size=1)
        assert one.certified is not None and one.certified[0] == a.certified[i]
        if a.certified[i]:
            assert verify_local(net, x[i], a.certificates[i])
