"""Regression tests from the adversarial soundness review of sdp.local (each failed before
its fix)."""

from __future__ import annotations

import numpy as np

from sdp.local import certify_local
from tests.sdp._local_nets import dense_net


def _min_sampled_margin(net, x0, y, eps, rng, n=4000):
    d = rng.normal(size=(n, x0.size))
    d *= (eps * rng.uniform(size=(n, 1)) ** (1 / x0.size)) / np.linalg.norm(d, axis=1)[:, None]
    f = net.forward(x0[None] + d)
    others = np.delete(f, y, axis=1)
    return float(np.min(f[:, y] - others.max(axis=1)))


def test_optimizer_writing_into_the_problem_cannot_shrink_the_ball():
    """A SlopeOptimizer that writes into its SlopeProblem (e.g. torch.from_numpy shares memory)
    must not change what the candidate alphas are re-checked on (it zeroed eps: certified 3x
    the true radius with adversarial examples inside)."""
    rng = np.random.default_rng(0)
    net = dense_net(rng, [3, 16, 16, 3], "relu")
    x = rng.normal(size=(4, 3))
    eps = certify_local(net, x, method="alpha-crown").radius * 3

    def evil(problem):
        problem.eps[:] = 0.0
        problem.x0[:] = 0.0
        for a in (*problem.pre_lower, *problem.pre_upper):
            a[:] = 0.0
        return list(problem.alpha_init)

    res = certify_local(net, x, epsilon=eps, method="alpha-crown", optimizer=evil)
    honest = certify_local(net, x, epsilon=eps, method="alpha-crown")
    assert res.certified is not None and honest.certified is not None
    np.testing.assert_array_equal(res.certified, honest.certified)
    for i in np.flatnonzero(res.certified):
        assert _min_sampled_margin(net, x[i], res.prediction[i], eps[i], rng) > 0


def test_bounds_of_an_input_do_not_depend_on_its_batch():
    """CROWN re-bounded a neuron of every input when it was unstable in ANY input of the
    batch: tighter boxes in a batch, so a certificate found in a batch failed verify_local
    (and B = 1 gave another answer)."""
    from sdp.local import verify_local

    rng = np.random.default_rng(4)
    net = dense_net(rng, [3, 5, 5, 5, 3], "leaky_relu", scale=3.0)
    x = rng.normal(size=(3, 3))
    eps = 0.3009242626931627
    batch = certify_local(net, x, method="crown", epsilon=eps)
    assert batch.certified is not None
    for i in range(3):
        alone = certify_local(net, x[i : i + 1], method="crown", epsilon=eps)
        assert alone.certified is not None
        assert alone.certified[0] == batch.certified[i]
        if batch.certified[i]:
            assert verify_local(net, x[i], batch.certificates[i])


def test_bab_on_a_network_without_hidden_layers():
    """bab on an affine network crashed with AssertionError (sdp-crown handled it)."""
    from sdp.ir import Dense, Network
    from sdp.local import verify_local

    net = Network((2,), (Dense(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2)),))
    x = np.array([[1.0, 0.0]])
    res = certify_local(net, x, method="bab", epsilon=0.5)
    assert res.certified is not None and res.certified[0]
    assert verify_local(net, x[0], res.certificates[0])
    # the exact radius is 1 / sqrt 2: above it nothing may be certified
    assert not certify_local(net, x, method="bab", epsilon=0.7072).certified[0]
    assert 0.6 < certify_local(net, x, method="bab", time_budget_s=2.0).radius[0] <= 2**-0.5
