"""Per-input (local) certification over l2 balls: IBP, CROWN, alpha-CROWN, radius search.

For an input x0 with predicted class y and a radius eps, the local methods bound every margin
f_y - f_j from below on the closed ball B = {x : ||x - x0||_2 <= eps}; the prediction is
certified on B iff every bound is > 0 (design.md §4.1):

* ``ibp``: interval bound propagation (Gowal et al., "On the Effectiveness of Interval Bound
  Propagation for Training Verifiably Robust Models", 2018), the ball enclosed in its box.
* ``crown``: linear bound propagation (Zhang et al., "Efficient Neural Network Robustness
  Certification with General Activation Functions", NeurIPS 2018): a backward pass gives
  f_y - f_j >= a^T x + c on B, whose minimum over the l2 ball is a^T x0 - eps ||a||_2 + c;
  intermediate (pre-activation) bounds by CROWN too, batched over inputs.
* ``alpha-crown``: the lower slopes of unstable ReLU-like neurons optimised per margin by
  projected gradient (Xu et al., "Fast and Complete", ICLR 2021), manual gradients in numpy.
* ``sdp-crown``: bound propagation with one Lagrange multiplier per layer on an l2 (ellipsoidal)
  coupling of the unstable neurons (Chiu, Chen, Zhang, Zhang, "SDP-CROWN", ICML 2025), slopes
  and multipliers optimised, intermediate bounds by the same method (:mod:`sdp.local.sdp_crown`);
  relu / leaky relu / identity chains (dense or conv).
* ``bab``: branch and bound on the unstable ReLUs of the last hidden layer over sdp-crown
  (:mod:`sdp.local.bab`); not part of ``auto`` (expensive).
* ``beta-crown``: branch and bound on the unstable ReLUs of every layer, split constraints
  by optimised Lagrange multipliers (Wang et al., "Beta-CROWN", NeurIPS 2021), every leaf
  re-checked rigorously (:mod:`sdp.local.beta_crown`); relu / leaky relu chains, in ``auto``
  after sdp-crown (``BUDGET_S`` seconds per input and eps).
* ``auto``: crown, then alpha-crown, then methods registered by other modules
  (:func:`sdp.local.margins.register_method`), cheapest first, on what is still uncertified
  (methods whose ``applies(graph)`` is false are skipped).

Soundness (floating point): every reported bound holds in exact arithmetic for the network as
imported. Rounding errors of the float64 products and sums are bounded a priori (Higham,
gamma_n |A||B|) and absorbed into the constant term with rigorous interval bounds of the
variables (Neumaier & Shcherbina 2004); relaxations of transcendental activations allow 16 ulps
of library error (as :mod:`sdp.rounding`); final bounds are rounded outward. Details in
:mod:`sdp.local.propagate`, :mod:`sdp.local.relax`, :mod:`sdp.local.fp`. Optimised slopes (ours or
a ``SlopeOptimizer``'s, e.g. torch on a GPU) are candidates only: the bound is recomputed.

Extension points: a new margin method is a :class:`sdp.local.margins.MarginMethod`
(``compute`` and ``recheck``) passed to ``register_method``; inside the propagation,
:func:`sdp.local.propagate.backward` and :func:`sdp.local.propagate.compute_bounds` accept an
``act_rule`` that replaces the step through any activation node (multipliers, offset and its
rigorous error term; see :class:`sdp.local.propagate.ActStep`).

Example::

    from sdp.local import certify_local, verify_local
    res = certify_local(net, x, labels=y, epsilon=0.1)          # certified at eps per input
    res = certify_local(net, x, global_bound=312.4)             # largest radius per input
    assert verify_local(net, x[0], res.certificates[0], lipschitz_bound=312.4)

``global_bound`` must be a VERIFIED bound (e.g. a stored LipSDP certificate's); a ``global``
certificate re-checks only against a bound the caller trusts (``lipschitz_bound``).
"""

import sdp.local.beta_crown  # noqa: F401  (registers "sdp-crown", "bab", then "beta-crown")
from sdp.local.certify import certify_local, verify_local
from sdp.local.types import (
    LocalCertificate,
    LocalMethodName,
    LocalResult,
    SlopeOptimizer,
    SlopeProblem,
)

__all__ = [
    "LocalCertificate",
    "LocalMethodName",
    "LocalResult",
    "SlopeOptimizer",
    "SlopeProblem",
    "certify_local",
    "verify_local",
]
