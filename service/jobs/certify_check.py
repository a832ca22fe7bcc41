"""Certification jobs from RQ workers: per-input certificates, re-checked by the API.

A worker's chunk carries, beside its columns, every input's
:class:`sdp.local.LocalCertificate` as plain arrays (npz, never pickles;
:func:`certificate_arrays`). The API trusts none of the worker's numbers
(design.md §1.6): per chunk, on its own network and its own copy of the inputs, it recomputes
prediction, rigorous margin and global-floor radius (:func:`sdp.local.certify.forward_margins`,
the same computation as ``certify_local`` on that chunk), then re-proves each certificate with
:func:`sdp.local.verify_local` (its bounds recomputed from scratch, floored radii against the
API's own verified bound L). An input whose certificate is missing, malformed or refused keeps
only what the API proved itself: radius = its global-floor radius m / (sqrt 2 L) (0 without a
bound), certified at eps iff eps < that radius. The columns and the summary are rebuilt from
these numbers (:func:`recheck_chunk`); the worker's own columns are not read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdp.ir import Network
from sdp.local import LocalCertificate, LocalResult, verify_local
from sdp.local.certify import forward_margins
from service.local_certify import local_columns

if TYPE_CHECKING:  # certify imports this module
    from service.jobs.certify import CertifyOptions

log = logging.getLogger("lipcert.jobs")

CERT = "cert_"
"""Prefix of the certificate columns in a chunk's arrays."""
PAYLOAD = "payload/"
"""Prefix of a certificate's payload arrays: ``payload/<row>/<j>/<name>``."""


def certificate_arrays(certs: Sequence[LocalCertificate]) -> dict[str, np.ndarray]:
    """The certificates of one chunk as arrays: (B,) columns ``cert_method``,
    ``cert_epsilon``, ``cert_prediction``, ``cert_network_hash``, ``cert_input_hash``,
    ``cert_global_bound`` (NaN for None) and one array per payload entry (the alphas are
    payload entries ``alpha:<node>``; ``lower_bounds`` are not sent: they are recomputed)."""
    out: dict[str, np.ndarray] = {
        CERT + "method": np.array([c.method for c in certs], dtype=str),
        CERT + "epsilon": np.array([c.epsilon for c in certs], dtype=np.float64),
        CERT + "prediction": np.array([c.prediction for c in certs], dtype=np.int64),
        CERT + "network_hash": np.array([c.network_hash for c in certs], dtype=str),
        CERT + "input_hash": np.array([c.input_hash for c in certs], dtype=str),
        CERT + "global_bound": np.array(
            [math.nan if c.global_bound is None else c.global_bound for c in certs],
            dtype=np.float64,
        ),
    }
    for i, c in enumerate(certs):
        for j, (name, arr) in enumerate(c.payload):
            out[f"{PAYLOAD}{i}/{j}/{name}"] = np.asarray(arr)
    return out


def read_certificates(arrays: dict[str, np.ndarray], rows: int) -> list[LocalCertificate | None]:
    """The ``rows`` certificates of a chunk's arrays; None for each one that is missing or
    malformed (nothing here is trusted: :func:`sdp.local.verify_local` decides)."""
    try:
        cols = {
            name: np.asarray(arrays[CERT + name]).reshape(-1)
            for name in ("method", "epsilon", "prediction", "network_hash", "input_hash")
        }
        glob = np.asarray(arrays.get(CERT + "global_bound", np.full(rows, np.nan))).reshape(-1)
    except (KeyError, ValueError):
        return [None] * rows
    if any(len(c) != rows for c in cols.values()) or len(glob) != rows:
        return [None] * rows
    payloads: dict[int, list[tuple[int, str, np.ndarray]]] = {}
    for key, arr in arrays.items():
        if not key.startswith(PAYLOAD):
            continue
        parts = key[len(PAYLOAD) :].split("/", 2)
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue
        if arr.dtype.kind not in "fiub":
            continue
        payloads.setdefault(int(parts[0]), []).append((int(parts[1]), parts[2], arr))
    out: list[LocalCertificate | None] = []
    for i in range(rows):
        try:
            pay = tuple((n, np.asarray(a)) for _, n, a in sorted(payloads.get(i, [])))
            g = float(glob[i])
            out.append(
                LocalCertificate(
                    method=str(cols["method"][i]),
                    epsilon=float(cols["epsilon"][i]),
                    prediction=int(cols["prediction"][i]),
                    network_hash=str(cols["network_hash"][i]),
                    input_hash=str(cols["input_hash"][i]),
                    alphas=tuple(
                        (int(n.split(":")[1]), a)
                        for n, a in pay
                        if n.startswith("alpha:") and n.split(":")[1].isdigit()
                    ),
                    global_bound=None if math.isnan(g) else g,
                    payload=pay,
                )
            )
        except (TypeError, ValueError, OverflowError):
            out.append(None)
    return out


@dataclass(frozen=True)
class ChunkCheck:
    """The rebuilt columns of one chunk and how many certificates were refused."""

    columns: dict[str, np.ndarray]
    refused: int


def _covers(cert: LocalCertificate, eps: float) -> bool:
    """Does a VERIFIED certificate certify the closed ball of radius eps? A local method's
    claim is the closed ball of radius cert.epsilon; ``global`` the open ball."""
    if cert.method == "none":
        return False
    if cert.method == "global":
        return eps < cert.epsilon
    return eps <= cert.epsilon


def recheck_chunk(
    net: Network,
    x_file: np.ndarray,
    labels: np.ndarray | None,
    epsilon: np.ndarray | None,
    lipschitz: float | None,
    certs: Sequence[LocalCertificate | None],
) -> ChunkCheck:
    """The columns of one chunk (rows ``x_file`` in the model file's layout) from the API's
    own numbers and the certificates it re-proves (see the module docstring).

    ``epsilon``: (B,) eps per input, None for a radius search; ``lipschitz``: the verified
    global bound the API trusts (the radius floor), None without one.
    """
    x = net.ir_inputs(np.asarray(x_file, dtype=np.float64).reshape(len(x_file), -1))
    b = x.shape[0]
    pred, margin, glob = forward_margins(net, x, lipschitz, int(net.forward(x[:1]).shape[1]))
    radius = glob.copy()
    method = ["global" if g > 0 else "none" for g in glob]
    certified = None if epsilon is None else np.asarray(epsilon) < glob
    refused = 0
    for i in range(b):
        c = certs[i] if i < len(certs) else None
        ok = (
            c is not None
            and c.prediction == pred[i]
            and verify_local(net, x[i], c, lipschitz_bound=lipschitz)
        )
        if not ok or c is None:
            refused += 1
            continue
        if epsilon is None:
            if c.epsilon > radius[i]:
                radius[i], method[i] = c.epsilon, c.method
        elif certified is not None and _covers(c, float(epsilon[i])) and not certified[i]:
            certified[i] = True
            radius[i], method[i] = c.epsilon, c.method
    result = LocalResult(
        prediction=pred,
        margin=margin,
        radius=radius,
        radius_method=tuple(method),
        global_radius=glob,
        epsilon=None if epsilon is None else np.asarray(epsilon, dtype=np.float64),
        certified=certified,
        correct=None if labels is None else (pred == labels),
        certificates=(),
    )
    return ChunkCheck(local_columns(result, labels), refused)


def recheck_batch(
    net: Network,
    inputs: dict[str, np.ndarray],
    opts: CertifyOptions,
    parts: Sequence[dict[str, np.ndarray] | None],
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Every chunk of a batch re-checked: (the rebuilt chunks, with the worker's ``seconds``
    and ``worker`` tag when well-formed, and how many certificates were refused)."""
    out: list[dict[str, np.ndarray]] = []
    refused = 0
    for k, (a, b) in enumerate(opts.chunks()):
        part = parts[k] if k < len(parts) else None
        certs = read_certificates(part, b - a) if part is not None else [None] * (b - a)
        eps: np.ndarray | None = None
        if "epsilon" in inputs:
            eps = np.asarray(inputs["epsilon"][a:b], dtype=np.float64)
        elif opts.epsilon is not None:
            eps = np.full(b - a, float(opts.epsilon))
        labels = inputs["labels"][a:b] if "labels" in inputs else None
        check = recheck_chunk(net, inputs["x"][a:b], labels, eps, opts.lipschitz, certs)
        refused += check.refused
        cols = dict(check.columns)
        seconds = 0.0
        if part is not None:
            try:
                seconds = float(part.get("seconds", 0.0))
            except (TypeError, ValueError):
                seconds = 0.0
            if "worker" in part and part["worker"].dtype.kind == "U" and part["worker"].ndim == 0:
                cols["worker"] = part["worker"]
        cols["seconds"] = np.array(seconds if math.isfinite(seconds) and seconds >= 0 else 0.0)
        out.append(cols)
    if refused:
        log.warning("certification batch %s: %d certificates refused", opts.batch_id, refused)
    return out, refused
