"""Re-prove a bound document (the JSON form of a :class:`~sdp.bounds.result.BoundResult`)
that came from elsewhere, e.g. a worker on another machine, before anyone serves it.

The document is not taken at its word. Every number in it is re-derived from the network the
caller holds (design.md §1.5):

* LipSDP and ECLipsE results (the methods with a certificate): the certificate (rho, T) must
  pass :func:`sdp.certificate.verify_on` on the caller's own network (``lipsdp-dag``:
  :func:`sdp.bounds.residual.verify_dag_on`), and the reported bound must be >= sqrt(rho);
* pairwise bounds: every pair (y, j) needs its own verified certificate with output map
  e_y - e_j, and the matrix entry must be >= its sqrt(rho);
* sandwich and naive/compositional results are recomputed (closed form / norm products; no
  solver) and the reported value must be >= the recomputed one.

:func:`adopt_document` records a re-proven document under the API's own network: a bound is
served only for the network its model imports to *here* (``Storage`` compares content
hashes), and a worker's float64 network may differ in the last bits (another BLAS, another
CPU) while the certificate still holds for the API's one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from sdp.bounds.compute import compute_bound
from sdp.bounds.residual import METHOD as DAG_METHOD
from sdp.bounds.residual import verify_dag_on
from sdp.certificate import Certificate, verify_on
from sdp.errors import CertificateError
from sdp.ir import Network

CERTIFIED_PREFIXES = ("lipsdp", "eclipse")
"""Methods whose bound is sqrt(rho) of a LipSDP-Neuron certificate (lipsdp-*, eclipse,
eclipse-fast, eclipse-refined): re-proven by the certificate, never by a recomputation."""
REL_TOL = 1e-9
"""A reported value may sit this much (relative) below a recomputed deterministic bound."""


def _proven(
    net: Network, cert_doc: Any, output_map: np.ndarray | None = None, *, dag: bool = False
) -> float:
    """sqrt(rho) of a certificate document, after verifying it on ``net`` (``dag``: as a
    ``lipsdp-dag`` certificate of the network's DAG)."""
    cert = Certificate.from_json(json.dumps(cert_doc))
    if output_map is None and cert.output_map is not None:
        # a certificate of P f is no bound of f (P = 1e-3 I would scale any bound down)
        raise CertificateError("certificate of the bound has an output map")
    if output_map is not None and (
        cert.output_map is None or not np.array_equal(cert.output_map, output_map)
    ):
        raise CertificateError("pairwise certificate has the wrong output map")
    if not (verify_dag_on(net, cert) if dag else verify_on(net, cert)):
        raise CertificateError("certificate does not verify on the stored network")
    return cert.lipschitz_bound


def recheck_document(net: Network, doc: dict[str, Any]) -> None:
    """Raise :class:`CertificateError` unless every bound in ``doc`` is re-proven for ``net``."""
    value = doc.get("lipschitz_bound")
    if not (doc.get("verified") and isinstance(value, float | int) and math.isfinite(value)):
        raise CertificateError("worker result is not a verified finite bound")
    method = str(doc.get("method", ""))
    if method.startswith(CERTIFIED_PREFIXES):
        if doc.get("certificate") is None:
            raise CertificateError(f"{method} result without its certificate")
        proven = _proven(net, doc["certificate"], dag=method == DAG_METHOD)
    else:
        recompute = "sandwich" if method == "sandwich" else "naive"
        proven = compute_bound(net, recompute, lower_bound=False).value * (1 - REL_TOL)
    if value < proven:
        raise CertificateError(f"reported bound {value} is below the proven {proven}")
    pairwise = doc.get("pairwise")
    if pairwise is None:
        return
    mat = np.asarray(pairwise, dtype=np.float64)
    k = net.output_size
    certs = doc.get("pairwise_certificates") or []
    covered = set()
    for cert_doc in certs:
        y, j = (int(v) for v in cert_doc.get("meta", {}).get("pair", (-1, -1)))
        if not (0 <= y < j < k):
            raise CertificateError("pairwise certificate without a valid pair")
        row = np.zeros((1, k))
        row[0, y], row[0, j] = 1.0, -1.0
        proven_pair = _proven(net, cert_doc, output_map=row)
        if not (mat[y, j] >= proven_pair and mat[j, y] >= proven_pair):
            raise CertificateError(f"pairwise bound ({y},{j}) is below its certificate")
        covered.add((y, j))
    if mat.shape != (k, k) or len(covered) != k * (k - 1) // 2:
        raise CertificateError("pairwise bounds are not all certified")


def adopt_document(net: Network, doc: dict[str, Any], *, trusted: bool = False) -> dict[str, Any]:
    """``doc`` as a bound of ``net``: re-proven on ``net`` (always unless ``trusted``, and
    whenever it names another network), then recorded under ``net``'s content hash.

    Raises :class:`CertificateError` when a bound in ``doc`` does not hold for ``net``.
    """
    net_hash = net.content_hash()
    if not trusted or doc.get("network_hash") != net_hash:
        recheck_document(net, doc)
    return {**doc, "network_hash": net_hash}
