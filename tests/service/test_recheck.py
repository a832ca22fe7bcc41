"""The API re-proves a worker's bound document before storing it (sdp.bounds.recheck)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import scipy.io

from sdp.bounds import compute_bound
from sdp.bounds.recheck import adopt_document, recheck_document
from sdp.errors import CertificateError
from sdp.ir import Activation, Dense, Network
from service.documents import StoredBound
from service.jobs.base import JobSpec


@pytest.fixture(scope="module")
def net(fixtures_dir) -> Network:
    ws = scipy.io.loadmat(fixtures_dir / "lipsdp" / "random_weights.mat")["weights"].ravel()
    ops: list = []
    for i, w in enumerate(ws):
        w = np.asarray(w, dtype=np.float64)
        ops.append(Dense(w, np.zeros(w.shape[0])))
        if i < len(ws) - 1:
            ops.append(Activation("relu"))
    return Network((ws[0].shape[1],), tuple(ops))


def _doc(net: Network, method: str, pairwise: bool = False) -> dict:
    res = compute_bound(net, method, pairwise=pairwise, lower_bound=False)
    spec = JobSpec(model_id="m", method=method, pairwise=pairwise)
    doc = StoredBound.from_result(res, net.content_hash(), spec.to_dict()).to_json()
    return json.loads(json.dumps(doc))  # strict JSON: what travels through Redis


def test_honest_documents_pass(net: Network) -> None:
    for method in ("lipsdp-neuron", "naive", "eclipse-fast", "eclipse-refined"):
        recheck_document(net, _doc(net, method))
    recheck_document(net, _doc(net, "lipsdp-neuron", pairwise=True))


def test_forged_lipsdp_documents_fail(net: Network) -> None:
    doc = _doc(net, "lipsdp-neuron")
    lowered = copy.deepcopy(doc)
    lowered["lipschitz_bound"] *= 0.99
    with pytest.raises(CertificateError, match="below"):
        recheck_document(net, lowered)
    forged = copy.deepcopy(doc)
    forged["lipschitz_bound"] *= 0.9
    forged["certificate"]["rho"] *= 0.81  # consistent numbers, but M(rho, T) is not NSD
    with pytest.raises(CertificateError, match="does not verify"):
        recheck_document(net, forged)
    no_cert = dict(doc, certificate=None)
    with pytest.raises(CertificateError, match="without its certificate"):
        recheck_document(net, no_cert)
    unverified = dict(doc, verified=False)
    with pytest.raises(CertificateError):
        recheck_document(net, unverified)


def test_forged_naive_and_pairwise_documents_fail(net: Network) -> None:
    naive = _doc(net, "naive")
    naive["lipschitz_bound"] *= 0.5
    with pytest.raises(CertificateError, match="below"):
        recheck_document(net, naive)
    doc = _doc(net, "lipsdp-neuron", pairwise=True)
    low = copy.deepcopy(doc)
    low["pairwise"][0][1] *= 0.5
    with pytest.raises(CertificateError, match="pairwise"):
        recheck_document(net, low)
    missing = copy.deepcopy(doc)
    missing["pairwise_certificates"] = []
    with pytest.raises(CertificateError, match="not all certified"):
        recheck_document(net, missing)


def test_adopt_records_a_reproven_document_under_the_api_network(net: Network) -> None:
    doc = _doc(net, "lipsdp-neuron")
    w0 = net.ops[0].weight.copy()
    w0[0, 0] = np.nextafter(w0[0, 0], np.inf)  # the same file read with other BLAS settings
    api_net = Network(net.input_shape, (Dense(w0, net.ops[0].bias), *net.ops[1:]))
    assert api_net.content_hash() != doc["network_hash"]
    adopted = adopt_document(api_net, doc, trusted=True)  # re-proven on the API's network
    assert adopted["network_hash"] == api_net.content_hash()
    assert adopted["lipschitz_bound"] == doc["lipschitz_bound"]
    assert adopt_document(net, doc, trusted=True) == doc  # same network: nothing to prove
    far = Network(net.input_shape, (Dense(2 * net.ops[0].weight, net.ops[0].bias), *net.ops[1:]))
    with pytest.raises(CertificateError):  # a bound that does not hold there is never adopted
        adopt_document(far, doc, trusted=True)


@pytest.mark.parametrize("method", ["lipsdp-neuron", "eclipse-fast"])
def test_certificate_of_a_scaled_output_is_no_bound_of_the_network(net: Network, method) -> None:
    """A certificate of P f with P = s I proves sqrt(rho) s-times smaller than Lip(f): as the
    certificate of the bound itself it must be refused (the output map is the pairwise one's)."""
    doc = _doc(net, method)
    cert, s = doc["certificate"], 1e-3
    cert["output_map"] = (s * np.eye(net.output_size)).tolist()
    cert["rho"] *= s * s
    cert["multipliers"] = [(np.asarray(t) * s * s).tolist() for t in cert["multipliers"]]
    doc["lipschitz_bound"] = doc["lipschitz_bound"] * s
    with pytest.raises(CertificateError, match="output map"):
        recheck_document(net, doc)
