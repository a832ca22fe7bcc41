"""The API re-proves a worker's bound document before storing it (service.jobs.recheck)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import scipy.io

from sdp.bounds import compute_bound
from sdp.errors import CertificateError
from sdp.ir import Activation, Dense, Network
from service.jobs.base import JobSpec
from service.jobs.recheck import recheck_document
from service.jobs.tasks import bound_document, json_safe


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
    return json.loads(json.dumps(json_safe(bound_document(res, spec, net.content_hash()))))


def test_honest_documents_pass(net: Network) -> None:
    for method in ("lipsdp-neuron", "naive"):
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
