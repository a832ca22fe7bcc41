"""Validation of the intermediate-row entries of alpha-CROWN certificate payloads (untrusted
input of verify_local): well-formed entries decode to what was encoded, and every kind of
malformed entry (node ids, row codes, value shapes, non-finite numbers, act nodes, values
without rows) is refused with ValueError, which verify_local turns into 'not verified'."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sdp.local import certify_local, verify_local
from sdp.local.alpha import SLOPE_DTYPE
from sdp.local.graph import build_graph
from sdp.local.margins import (
    _decode_inter,
    _decode_inter_lines,
    _encode_inter,
    _encode_inter_lines,
    get_method,
)
from tests.sdp._local_nets import dense_net
from tests.sdp.test_local_attack import residual_net

# nodes: 0 input (3), 1 affine (4), 2 act (4), 3 affine (5), 4 act (5), 5 affine (2)
SIG = build_graph(dense_net(np.random.default_rng(0), [3, 4, 5, 2], "sigmoid"))
RELU = build_graph(dense_net(np.random.default_rng(0), [3, 4, 5, 2], "relu"))


def _alpha_payload(rows=(0, 3), t=3, k=2, alphas=None):
    a = np.full((2 * len(rows), 4), 0.5) if alphas is None else alphas
    return ((f"irows:{t}", np.asarray(rows, dtype=np.float64)), (f"ialpha:{t}:{k}", a))


def _tangent_payload(rows=(0, 7), t=3, k=2, slopes=None, edit=None):
    """Built by the real encoder (whatever its format), then ``edit(key, array)`` -> entries."""
    s = np.full((len(rows), 4), 0.2, dtype=np.float32) if slopes is None else slopes
    payload = _encode_inter_lines({t: (np.asarray(rows, dtype=np.float64), {k: s})})
    if edit is None:
        return payload
    return tuple(e for key, arr in payload for e in edit(key, arr))


def _on(tag, fn):
    """An edit: entries whose key starts with ``tag`` become fn(array), or go if fn is None."""

    def edit(key, arr):
        if not key.startswith(tag):
            return [(key, arr)]
        return [] if fn is None else [(key, fn(arr))]

    return edit


def test_well_formed_entries_round_trip():
    rng = np.random.default_rng(1)
    found = {3: (np.array([0, 2, 4]), {2: rng.uniform(size=(6, 4))})}
    got = _decode_inter(SIG, _encode_inter(found))
    assert set(got) == {3}
    assert np.array_equal(got[3][0], found[3][0]) and got[3][0].dtype == np.intp
    assert np.array_equal(got[3][1][2], found[3][1][2])
    slopes = rng.normal(size=(2, 4)).astype(SLOPE_DTYPE)
    slopes[1, 2] = np.nan  # an entry on the relaxation's own line
    lines = {3: (np.array([1, 9]), {2: slopes})}
    got_l = _decode_inter_lines(SIG, _encode_inter_lines(lines))
    assert np.array_equal(got_l[3][0], [1, 9])
    assert np.array_equal(got_l[3][1][2], slopes, equal_nan=True)
    # each decoder reads only its own entries
    both = _encode_inter(found) + _encode_inter_lines(lines)
    assert set(_decode_inter(SIG, both)) == set(_decode_inter_lines(SIG, both)) == {3}
    # alpha rows may be empty (no alphas then); tangent rows may not
    assert _decode_inter(SIG, (("irows:3", np.zeros(0)),))[3][0].size == 0


ALPHA_BAD = {
    "target out of range": _alpha_payload(t=6),
    "negative target": (("irows:-1", np.array([0.0])),),
    "node id not an integer": (("irows:x", np.array([0.0])),),
    "row not an integer": _alpha_payload(rows=(0, 2.5)),
    "row NaN": _alpha_payload(rows=(0, np.nan)),
    "row inf": _alpha_payload(rows=(0, np.inf)),
    "row -inf": _alpha_payload(rows=(-np.inf, 0)),
    "row negative": _alpha_payload(rows=(-1, 0)),
    "row past the node": _alpha_payload(rows=(0, 5)),
    "alphas of the input node": _alpha_payload(k=0),
    "alphas of an affine node": _alpha_payload(k=1),
    "alphas above the target": _alpha_payload(t=3, k=4, alphas=np.full((4, 5), 0.5)),
    "alphas NaN": _alpha_payload(alphas=np.full((4, 4), np.nan)),
    "alphas inf": _alpha_payload(alphas=np.full((4, 4), np.inf)),
    "alphas 1-D": _alpha_payload(alphas=np.full(16, 0.5)),
    "alphas wrong columns": _alpha_payload(alphas=np.full((4, 3), 0.5)),
    "alphas wrong rows": _alpha_payload(alphas=np.full((3, 4), 0.5)),
    "alphas without rows": _alpha_payload()[1:],
}


@pytest.mark.parametrize("case", sorted(ALPHA_BAD))
def test_malformed_alpha_entries_are_refused(case):
    with pytest.raises(ValueError):
        _decode_inter(SIG, ALPHA_BAD[case])


TANGENT_BAD = {
    "target out of range": _tangent_payload(t=6),
    "no rows": _tangent_payload(rows=(), slopes=np.zeros((0, 4), dtype=np.float32)),
    "row not an integer": _tangent_payload(rows=(0, 1.5)),
    "row NaN": _tangent_payload(rows=(np.nan, 1)),
    "row inf": _tangent_payload(rows=(0, np.inf)),
    "row negative": _tangent_payload(rows=(-1, 0)),
    "row code past 2 n": _tangent_payload(rows=(0, 10)),
    "slopes of an affine node": _tangent_payload(k=1),
    "slopes above the target": _tangent_payload(t=3, k=4, slopes=np.zeros((2, 5))),
    "slopes wrong columns": _tangent_payload(slopes=np.zeros((2, 5), dtype=np.float32)),
    "slopes wrong rows": _tangent_payload(slopes=np.zeros((3, 4), dtype=np.float32)),
    "slopes NaN": _tangent_payload(edit=_on("tsl:", lambda a: np.full_like(a, np.nan))),
    "slopes inf": _tangent_payload(edit=_on("tsl:", lambda a: np.full_like(a, np.inf))),
    "slopes one short": _tangent_payload(edit=_on("tsl:", lambda a: a[:-1])),
    "slopes 3-D": _tangent_payload(edit=_on("tsl:", lambda a: a[None])),
    "slopes without rows": _tangent_payload(edit=_on("trows:", None)),
}


@pytest.mark.parametrize("case", sorted(TANGENT_BAD))
def test_malformed_tangent_entries_are_refused(case):
    with pytest.raises(ValueError):
        _decode_inter_lines(SIG, TANGENT_BAD[case])


def test_tangent_slopes_only_on_sigmoid_or_tanh_nodes():
    ok = _tangent_payload()
    assert _decode_inter_lines(SIG, ok)[3][1][2].shape == (2, 4)
    # an act node as target (residual nets bound an activation's output before an add) runs
    # its rows through its own relaxation: its slopes are allowed (any slope is sound)
    own = _tangent_payload(t=4, k=4, rows=(0, 7), slopes=np.zeros((2, 5), dtype=np.float32))
    assert _decode_inter_lines(SIG, own)[4][1][4].shape == (2, 5)
    with pytest.raises(ValueError):
        _decode_inter_lines(RELU, ok)
    # alphas of a ReLU node are fine (any act node)
    assert _decode_inter(RELU, _alpha_payload())[3][1][2].shape == (4, 4)


def test_verify_local_refuses_tampered_intermediate_alphas():
    rng = np.random.default_rng(3)
    net = dense_net(rng, [5, 10, 10, 10, 3], "relu", scale=1.5)
    x = rng.normal(size=(1, 5))
    cert = certify_local(net, x, epsilon=0.3, method="alpha-crown").certificates[0]
    assert cert is not None and any(k.startswith("irows:") for k, _ in cert.payload), "vacuous"
    assert verify_local(net, x[0], cert)
    for bad in (
        lambda k, a: [(k, a + 1e6)] if k.startswith("irows:") else [(k, a)],
        lambda k, a: [(k, a + 0.5)] if k.startswith("irows:") else [(k, a)],
        lambda k, a: [(k, a * np.nan)] if k.startswith("ialpha:") else [(k, a)],
        lambda k, a: [(k, a[:-1])] if k.startswith("ialpha:") else [(k, a)],
        lambda k, a: [] if k.startswith("irows:") else [(k, a)],
        lambda k, a: [(k.rsplit(":", 1)[0] + ":1", a)] if k.startswith("ialpha:") else [(k, a)],
    ):
        broken = tuple(e for k, a in cert.payload for e in bad(k, a))
        assert not verify_local(net, x[0], replace(cert, payload=broken))


def test_residual_tanh_certificates_with_target_slopes_verify():
    """A residual tanh net bounds an activation's output (node 7) through its own tangent
    relaxation: alpha-crown records slopes there (tsm:7:7) and verify_local must accept them
    (it refused them until 2026-12-07: certified inputs failed verification)."""
    rng = np.random.default_rng(7)
    net = residual_net(rng, "tanh")
    x = rng.normal(size=(5, net.input_size))
    res = certify_local(net, x, method="alpha-crown", epsilon=0.5)
    own = [i for i, c in enumerate(res.certificates) if any(k == "tsm:7:7" for k, _ in c.payload)]
    assert own and all(res.certified[i] for i in own)
    assert all(verify_local(net, x[i], res.certificates[i]) for i in own)


def test_nodes_without_own_slopes_are_not_stored_and_old_entries_still_decode():
    """A node whose entries all use the relaxation's own line (all NaN) gets no tsm/tsl
    entry; the all-zero mask and empty slopes that certificates held for it until 2026-12-07
    still decode, to all NaN."""
    rows = np.array([0.0, 7.0])
    own = np.full((2, 4), np.nan, dtype=SLOPE_DTYPE)
    assert [k for k, _ in _encode_inter_lines({3: (rows, {2: own})})] == ["trows:3"]
    old = (
        ("trows:3", rows),
        ("tsm:3:2", np.packbits(np.zeros(8, dtype=bool))),
        ("tsl:3:2", np.zeros(0, dtype=SLOPE_DTYPE)),
    )
    got = _decode_inter_lines(SIG, old)[3][1][2]
    assert got.shape == (2, 4) and np.isnan(got).all()


def test_an_old_all_own_line_entry_replays_as_its_absence():
    """On a real certificate: one node's slopes replaced by the old all-zero mask + empty
    slopes, or dropped as the encoder now does, give the same rechecked margins, bit for bit
    (both mean the relaxation's own line on every entry)."""
    rng = np.random.default_rng(8)
    net = dense_net(rng, [10, 14, 14, 14, 4], "sigmoid", scale=3.0)
    x = rng.normal(size=(1, 10))
    cert = certify_local(net, x, epsilon=0.3, method="alpha-crown").certificates[0]
    assert cert is not None
    key = next((k for k, _ in cert.payload if k.startswith("tsm:")), None)
    assert key is not None, "no tangent slopes stored: vacuous"
    pair = key[len("tsm:") :]
    mask = dict(cert.payload)[key]
    rest = tuple((k, a) for k, a in cert.payload if k not in (key, f"tsl:{pair}"))
    old = (*rest, (key, np.zeros_like(mask)), (f"tsl:{pair}", np.zeros(0, dtype=SLOPE_DTYPE)))
    recheck = get_method("alpha-crown").recheck
    graph = build_graph(net)
    args = (graph, x[0], cert.epsilon, cert.prediction)
    np.testing.assert_array_equal(recheck(*args, old), recheck(*args, rest))
    assert verify_local(net, x[0], replace(cert, payload=old)) == verify_local(
        net, x[0], replace(cert, payload=rest)
    )
