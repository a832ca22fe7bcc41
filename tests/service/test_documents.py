"""The typed documents of service.documents keep the JSON the service always wrote: a stored
bound's keys and order (rows written before the typed document must read back and write out
unchanged), unknown keys kept, job errors as {code, detail}."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdp.bounds import compute_bound
from sdp.ir import Activation, Dense, Network
from service.documents import JobError, StoredBound, strict_json


def _net() -> Network:
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(5, 3)), rng.normal(size=(3, 5))
    return Network((3,), (Dense(w1, np.zeros(5)), Activation("relu"), Dense(w2, np.zeros(3))))


def _old_document(result, network_hash: str, request: dict | None) -> dict:
    """The document as service.jobs.tasks.bound_document built it before StoredBound."""
    doc = result.summary()
    doc["network_hash"] = network_hash
    if result.certificate is not None:
        doc["certificate"] = json.loads(result.certificate.to_json())
    if result.pairwise_certificates:
        doc["pairwise_certificates"] = [
            json.loads(c.to_json()) for c in result.pairwise_certificates
        ]
    if request is not None:
        doc["request"] = request
    return doc


@pytest.mark.parametrize(("method", "pairwise"), [("naive", False), ("lipsdp-neuron", True)])
def test_a_job_document_keeps_its_keys_and_their_order(method: str, pairwise: bool) -> None:
    net = _net()
    result = compute_bound(net, method, pairwise=pairwise, lower_bound=False)
    request = {"model_id": "m", "method": method, "pairwise": pairwise}
    old = _old_document(result, net.content_hash(), request)
    old.update(job_id="j1", model_id="m")  # what the runner added
    old = json.loads(json.dumps(strict_json(old), allow_nan=False))
    new = StoredBound.from_result(result, net.content_hash(), request).for_job("j1", "m")
    assert json.dumps(new.to_json()) == json.dumps(old)  # same keys, order and values
    back = StoredBound.from_json(new.to_json())
    assert back == new and back.to_json() == new.to_json()
    if pairwise:
        mat = back.pairwise_matrix(3)
        assert mat is not None and mat.shape == (3, 3)
        assert np.array_equal(
            np.nan_to_num(mat, nan=-1.0),
            np.nan_to_num(np.asarray(result.pairwise, dtype=np.float64), nan=-1.0, posinf=-1.0),
        )


def test_an_upload_document_and_an_old_minimal_row_read_back() -> None:
    net = _net()
    result = compute_bound(net, "naive", lower_bound=False)
    old = {**_old_document(result, net.content_hash(), None), "job_id": None, "source": "upload"}
    new = StoredBound.from_result(result, net.content_hash(), source="upload")
    assert json.dumps(new.to_json()) == json.dumps(strict_json(old))
    # an old row with only some keys and one this version does not know
    row = {"lipschitz_bound": 2.5, "verified": True, "method": "x", "future_key": [1, 2]}
    bound = StoredBound.from_json(row)
    assert bound.usable_lipschitz == 2.5 and bound.extra == {"future_key": [1, 2]}
    assert bound.to_json()["future_key"] == [1, 2]
    assert StoredBound.from_json(bound.to_json()) == bound


def test_a_document_without_a_finite_bound_is_never_usable() -> None:
    for value in (None, "3", math.inf, -1.0, 0.0):
        bound = StoredBound.from_json({"lipschitz_bound": value, "verified": True})
        assert bound.usable_lipschitz is None
    assert StoredBound.from_json({"lipschitz_bound": 1.0, "verified": "yes"}).verified is False
    assert StoredBound(1.0, pairwise=[[1.0, "a"], [None, 2.0]]).pairwise_matrix(2) is None
    assert StoredBound(1.0, pairwise=[[1.0, 2.0]]).pairwise_matrix(2) is None  # wrong shape


def test_job_errors_are_code_and_detail() -> None:
    err = JobError("timeout", "no result within 5 s")
    assert err.to_json() == {"code": "timeout", "detail": "no result within 5 s"}
    assert JobError.from_json(err.to_json()) == err
    assert JobError.from_json(None) is None
    assert JobError.from_json({"code": "cancelled"}) == JobError("cancelled", "")
