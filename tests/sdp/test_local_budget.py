"""The radius search of :func:`sdp.local.certify_local` keeps to its time budget, and
alpha-crown's / beta-crown's optimisation stops at its deadline with a sound answer.

Not a speed target: the budget is time_budget_s per input for the whole call (start-up, the
beta-crown CROWN start and every probe included), checked with a tolerance generous enough for
a loaded machine; a search that ignored the budget (a probe of at least 1 s, ten CROWN steps
whatever the budget) would still exceed it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from sdp.ir import Dense, Network
from sdp.local import beta_crown, certify_local, clock, verify_local
from sdp.local.graph import build_graph
from sdp.local.margins import alpha_crown, get_method
from tests.sdp._local_nets import act, conv_layer, dense_net
from tests.sdp.test_local_attack import pgd_min_margin

TOLERANCE_S = 0.5


@pytest.mark.parametrize("method", ["auto", "beta-crown", "alpha-crown"])
def test_radius_search_keeps_to_the_budget(method: str) -> None:
    net = dense_net(np.random.default_rng(0), [4, 16, 16, 3])
    x = np.random.default_rng(1).normal(size=(4, 4))
    budget = 0.05  # seconds per input: a few probes at most
    certify_local(net, x[:1], epsilon=0.01, method=method)  # imports and caches, untimed
    t = time.perf_counter()
    res = certify_local(net, x, method=method, time_budget_s=budget, global_bound=10.0)
    wall = time.perf_counter() - t
    assert wall <= budget * len(x) + TOLERANCE_S, wall
    assert (res.radius >= res.global_radius).all()


def _deep_conv(rng: np.random.Generator, name: str) -> Network:
    """conv -> act -> dense -> act -> dense -> act -> dense: intermediate layers to optimise."""
    c1 = conv_layer(rng, stride=(1, 1))
    sizes = [c1.out_features, 12, 12, 4]
    ops: list = [c1]
    for i in range(3):
        w = rng.normal(size=(sizes[i + 1], sizes[i])) * (0.3 if i == 0 else 0.5)
        ops += [act(name), Dense(w, rng.normal(size=sizes[i + 1]) * 0.1)]
    return Network((2, 5, 5), tuple(ops))


@pytest.mark.parametrize("name", ["relu", "sigmoid"])
def test_alpha_crown_past_its_deadline_is_crown(name: str) -> None:
    """A deadline already passed: no Adam step, no intermediate record (the replay does
    nothing either), and the bounds are exactly CROWN's (its start, bounded rigorously);
    without a deadline the same call optimises (so the first half is not vacuous)."""
    rng = np.random.default_rng(3)
    net = _deep_conv(rng, name)
    x = rng.normal(size=(3, net.input_size))
    graph = build_graph(net)
    pred = np.argmax(net.forward(x), axis=1)
    eps = np.full(3, 0.1)
    crown = get_method("crown").compute(graph, x, eps, pred).lower
    past = alpha_crown(graph, x, eps, pred, deadline=clock.now() - 1.0)
    assert np.array_equal(past.lower, crown)
    inter = ("irows:", "ialpha:", "trows:", "tsl:")
    assert not any(k.startswith(inter) for p in past.payloads for k, _ in p)
    full = alpha_crown(graph, x, eps, pred)
    assert any(k.startswith(inter) for p in full.payloads for k, _ in p)
    for i in range(3):  # the stopped answer's payload replays (alone: last-bit batch effects)
        again = get_method("alpha-crown").recheck(graph, x[i], 0.1, int(pred[i]), past.payloads[i])
        np.testing.assert_allclose(again, past.lower[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["alpha-crown", "beta-crown", "auto"])
def test_tiny_budget_at_eps_gives_verified_answers_or_none(method: str) -> None:
    """At one eps a budget far below one optimisation step (alpha-crown's Adam and
    beta-crown's root stop at once): every input gets an answer, no error; each certified
    one re-verifies and survives PGD inside its ball."""
    rng = np.random.default_rng(5)
    net = _deep_conv(rng, "relu")
    x = rng.normal(size=(4, net.input_size))
    for eps in (0.3, 0.5):  # CROWN leaves some inputs to the optimisers at both
        res = certify_local(net, x, epsilon=eps, method=method, time_budget_s=1e-6)
        assert res.certified is not None and res.certified.shape == (4,)
        ok = np.flatnonzero(res.certified)
        assert ok.size, "nothing certified: vacuous"
        for i in ok:
            assert verify_local(net, x[i], res.certificates[i])
        m = pgd_min_margin(net, x[ok], res.prediction[ok], np.full(ok.size, eps))
        assert np.all(m > 0)


def test_beta_crown_root_counts_against_the_deadline() -> None:
    """beta-crown's alpha-CROWN root with its deadline passed records no intermediate
    alphas and bounds the margins exactly as CROWN does (rigorous, just not optimised)."""
    rng = np.random.default_rng(9)
    net = _deep_conv(rng, "relu")
    x = rng.normal(size=(1, net.input_size))
    graph = build_graph(net)
    pred = np.argmax(net.forward(x), axis=1)
    eps = np.array([0.1])
    _, low, _, hook, _ = beta_crown._root(graph, x, eps, pred, clock.now() - 1.0)
    assert not any(hook.found[0].values())
    assert np.array_equal(low, get_method("crown").compute(graph, x, eps, pred).lower)
    _, _, _, full, _ = beta_crown._root(graph, x, eps, pred)
    assert any(full.found[0].values()), "the root optimised nothing anyway: vacuous"


def test_beta_crown_at_eps_with_its_budget_spent_is_crown(monkeypatch: pytest.MonkeyPatch) -> None:
    """No budget left after CROWN (BUDGET_S = 0): no root, no search; CROWN's bounds and empty
    payloads (which re-check as CROWN), so an input is certified iff CROWN certifies it."""
    monkeypatch.setattr(beta_crown, "BUDGET_S", 0.0)
    rng = np.random.default_rng(5)
    net = _deep_conv(rng, "relu")
    x = rng.normal(size=(4, net.input_size))
    graph = build_graph(net)
    pred = np.argmax(net.forward(x), axis=1)
    eps = np.full(4, 0.3)
    got = get_method("beta-crown").compute(graph, x, eps, pred)
    crown = get_method("crown").compute(graph, x, eps, pred).lower
    assert np.array_equal(got.lower, crown) and got.payloads == ((),) * 4
    assert not np.all(crown > 0), "CROWN certifies everything: vacuous"
    res = certify_local(net, x, epsilon=0.3, method="beta-crown")
    assert res.certified is not None
    for i in np.flatnonzero(res.certified):
        assert verify_local(net, x[i], res.certificates[i])


def test_beta_crown_radius_search_reports_its_crown_start() -> None:
    """A budget the CROWN start alone would overrun: every input keeps the radius CROWN
    certified in the start (its first probe, 0.1, always runs), with an empty payload that the
    re-check replays as CROWN. (Before, the start ran to the batch's end, the later inputs met
    their deadlines before any probe and the start's radii were dropped: radius 0.)"""
    net = dense_net(np.random.default_rng(0), [100, 64, 64, 64, 10], "relu", scale=2.0)
    graph = build_graph(net)
    x = np.random.default_rng(1).normal(size=(4, 100))
    pred = np.argmax(net.forward(x), axis=1)
    crown = get_method("crown")
    assert (crown.compute(graph, x, np.full(4, 0.1), pred).lower > 0).all()
    radius, lower, payloads = beta_crown._search_radius(graph, x, pred, np.zeros(4), 1e-4)
    assert (radius >= 0.1).all(), radius
    for i in range(4):
        again = beta_crown._recheck(graph, x[i], float(radius[i]), int(pred[i]), payloads[i])
        assert (again > 0).all()
        assert (lower[i] > 0).all()


def test_beta_crown_at_eps_keeps_to_the_callers_budget() -> None:
    """At one eps the caller's ``time_budget_s`` caps beta-crown's own: with nothing left
    after CROWN, no root and no branch and bound run, every answer is CROWN's (empty payload)."""
    rng = np.random.default_rng(5)
    net = _deep_conv(rng, "relu")
    x = rng.normal(size=(4, net.input_size))
    graph = build_graph(net)
    pred = np.argmax(net.forward(x), axis=1)
    crown = get_method("crown").compute(graph, x, np.full(4, 0.3), pred).lower
    full = get_method("beta-crown").compute(graph, x, np.full(4, 0.3), pred)
    assert any(full.payloads), "beta-crown's own budget adds nothing here: vacuous"
    res = certify_local(net, x, epsilon=0.3, method="beta-crown", time_budget_s=1e-9)
    assert res.certified is not None
    assert np.array_equal(res.certified, np.all(crown > 0, axis=1))
    assert all(c.payload == () for c in res.certificates)


def test_sdp_crown_begins_no_input_past_the_callers_deadline() -> None:
    """sdp-crown with the caller's deadline passed runs its first input only (the floor of a
    step); the others keep CROWN's bounds with an empty payload, which re-checks at least as CROWN.
    (Before, a radius search began sdp-crown on the whole batch with alpha-crown's last probe
    time: 2.8 CPU s for a 0.36 s budget.)"""
    rng = np.random.default_rng(2)
    net = dense_net(rng, [4, 12, 12, 3], "relu")
    x = rng.normal(size=(3, 4))
    graph = build_graph(net)
    pred = np.argmax(net.forward(x), axis=1)
    eps = np.full(3, 0.2)
    sdp = get_method("sdp-crown")
    assert sdp.budgeted is not None
    got = sdp.budgeted(graph, x, eps, pred, clock.now() - 1.0)
    crown = get_method("crown").compute(graph, x, eps, pred).lower
    assert got.payloads[0] and got.payloads[1:] == ((), ())
    assert np.array_equal(got.lower[1:], crown[1:])
    assert (got.lower[0] >= crown[0]).all()
    for i in range(1, 3):
        again = sdp.recheck(graph, x[i], 0.2, int(pred[i]), ())
        assert (np.delete(again, pred[i]) >= np.delete(crown[i], pred[i])).all()
