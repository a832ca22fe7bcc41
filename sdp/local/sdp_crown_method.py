"""The ``sdp-crown`` and ``bab`` local methods (:mod:`sdp.local.sdp_crown`, :mod:`sdp.local.bab`)
behind the margin-method registry (``bab`` is not in ``auto``: it costs up to 24 SDP-CROWN
solves per margin).

Registered with :func:`sdp.local.margins.register_method` when :mod:`sdp.local` is imported.
Chains of dense/conv layers with relu, leaky relu (slope in [0, 1]) or identity activations;
other networks raise :class:`sdp.errors.NotApplicable` (``auto`` skips the method there).
The certificate payload holds the optimised multipliers (slopes times coefficients g and
the coupling multipliers lam) of the intermediate bounds and of the margins;
:func:`recheck` recomputes every bound from them with rigorous rounding, nothing else is
trusted. Each bound is the larger of this and CROWN's (both rigorous), so sdp-crown is never
below CROWN.
"""

from __future__ import annotations

import numpy as np

from sdp.errors import NotApplicable
from sdp.ir import Array
from sdp.local import bab, clock
from sdp.local.graph import Graph
from sdp.local.margins import MarginBounds, MarginMethod, Payload, get_method, register_method
from sdp.local.sdp_crown import (
    Layer,
    decode_record,
    encode_record,
    layers_from_ops,
    margin_lower_bounds,
)

ITERATIONS = 40
"""Optimiser steps for the margins."""
INTER_ITERATIONS = 20
"""Optimiser steps for the intermediate bounds of each layer."""


def graph_layers(graph: Graph) -> list[Layer]:
    """The chain of a :class:`Graph` as sdp-crown layers (NotApplicable otherwise)."""
    for nd in graph.nodes[1:]:
        if nd.kind not in ("affine", "act") or nd.parents != (nd.index - 1,):
            raise NotApplicable("sdp-crown handles chains of dense/conv layers only")
    return layers_from_ops([nd.op for nd in graph.nodes[1:]], graph.input_size)


def applies(graph: Graph) -> bool:
    try:
        graph_layers(graph)
    except NotApplicable:
        return False
    return True


def _compute(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    return _compute_by(graph, x0, eps, pred, None)


def _compute_by(
    graph: Graph, x0: Array, eps: Array, pred: np.ndarray, deadline: float | None
) -> MarginBounds:
    """sdp-crown per input, each begun only while the last one's time fits before the
    caller's ``deadline`` (:func:`sdp.local.clock.fits`; the first always runs); an input not
    begun keeps CROWN's bounds with an empty payload (its re-check is CROWN's). Before, a
    radius search began sdp-crown with alpha-crown's last probe time (milliseconds) and ran
    it on every input: 2.8 CPU s for a 0.36 s budget (12 inputs, 4-7-11-20-11-3 net)."""
    layers = graph_layers(graph)
    lower = np.full((x0.shape[0], graph.output_size), -np.inf)
    payloads: list[Payload] = [() for _ in range(x0.shape[0])]
    step = 0.0  # seconds of the last input
    for i in range(x0.shape[0]):
        if i and not clock.fits(deadline, step):
            break
        t = clock.now()
        lower[i], rec = margin_lower_bounds(
            layers,
            x0[i],
            float(eps[i]),
            int(pred[i]),
            iters=ITERATIONS,
            inter_iters=INTER_ITERATIONS,
        )
        payloads[i] = encode_record(rec)
        step = clock.now() - t
    crown = get_method("crown").compute(graph, x0, eps, pred).lower
    return MarginBounds(np.maximum(lower, crown), tuple(payloads))


def _recheck(graph: Graph, x0: Array, eps: float, y: int, payload: Payload) -> Array:
    try:
        layers = graph_layers(graph)
    except NotApplicable as exc:
        raise ValueError(str(exc)) from exc
    rec = decode_record(layers, payload, graph.output_size)
    x = np.asarray(x0, dtype=np.float64)
    lower, _ = margin_lower_bounds(layers, x, eps, y, stored=rec)
    crown = get_method("crown").recheck(graph, x, eps, y, ())
    return np.maximum(lower, crown)


def _bab_compute(graph: Graph, x0: Array, eps: Array, pred: np.ndarray) -> MarginBounds:
    layers = graph_layers(graph)
    lower = np.empty((x0.shape[0], graph.output_size))
    payloads: list[Payload] = []
    for i in range(x0.shape[0]):
        lower[i], rec, trees = bab.bab_margin_bounds(layers, x0[i], float(eps[i]), int(pred[i]))
        payloads.append(bab.encode(rec, trees))
    crown = get_method("crown").compute(graph, x0, eps, pred).lower
    return MarginBounds(np.maximum(lower, crown), tuple(payloads))


def _bab_recheck(graph: Graph, x0: Array, eps: float, y: int, payload: Payload) -> Array:
    try:
        layers = graph_layers(graph)
    except NotApplicable as exc:
        raise ValueError(str(exc)) from exc
    rec, trees = bab.decode(layers, payload, graph.output_size)
    x = np.asarray(x0, dtype=np.float64)
    lower = bab.recheck_bab(layers, x, eps, y, rec, trees)
    return np.maximum(lower, get_method("crown").recheck(graph, x, eps, y, ()))


register_method(
    MarginMethod("sdp-crown", _compute, _recheck, applies=applies, budgeted=_compute_by)
)
register_method(MarginMethod("bab", _bab_compute, _bab_recheck, in_auto=False, applies=applies))
