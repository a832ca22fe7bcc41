"""A bound computed in another process, or on another machine, becomes a bound of the network
the API serves (design.md §1.5)."""

from __future__ import annotations

from sdp.bounds.recheck import adopt_document
from sdp.ir import Network
from service.documents import StoredBound


def adopt_bound(bound: StoredBound, net: Network, *, trusted: bool = False) -> StoredBound:
    """``bound`` as a bound of ``net``: re-proven on ``net`` by sdp
    (:func:`sdp.bounds.recheck.adopt_document`: always unless ``trusted``, and whenever it
    names another network), then recorded under ``net``'s content hash. Raises
    :class:`sdp.errors.CertificateError` when it does not hold for ``net``."""
    return StoredBound.from_json(adopt_document(net, bound.to_json(), trusted=trusted))
