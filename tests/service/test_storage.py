"""Storage: content addressing, bounds (best = smallest verified), persistence, deletion."""

from __future__ import annotations

import hashlib
import threading

import pytest

from service.documents import StoredBound
from service.parsing import ModelChecker
from service.storage import Storage
from tests.service.old_store import OLD_TABLES
from tests.service.onnx_nets import mlp_onnx


@pytest.fixture
def onnx_bytes(rw_weights) -> bytes:
    return mlp_onnx(rw_weights)


def test_same_bytes_same_record(tmp_path, onnx_bytes) -> None:
    s = Storage(tmp_path)
    a = s.save_model(onnx_bytes, "a.onnx")
    b = s.save_model(onnx_bytes, "b.onnx")
    assert a.created and not b.created
    assert a.id == b.id == hashlib.sha256(onnx_bytes).hexdigest()[:16]
    assert b.filename == "a.onnx"  # the first upload's record is kept
    assert s.model_bytes(a.id) == onnx_bytes
    assert [m.id for m in s.list_models()] == [a.id]
    assert (tmp_path / "models" / f"{a.sha256}.bin").read_bytes() == onnx_bytes


def test_best_bound_ignores_unverified_and_survives_reopen(tmp_path, onnx_bytes) -> None:
    s = Storage(tmp_path)
    mid = s.save_model(onnx_bytes).id
    assert s.best_bound(mid) is None
    s.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": 40.0, "method": "lipsdp-layer", "verified": True}
        ),
    )
    s.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 1.0, "method": "x", "verified": False})
    )
    s.save_bound(
        mid,
        StoredBound.from_json(
            {"lipschitz_bound": 36.5, "method": "lipsdp-neuron", "verified": True, "job_id": "j"}
        ),
    )
    with pytest.raises(ValueError):
        s.save_bound(
            mid,
            StoredBound.from_json(
                {"lipschitz_bound": float("nan"), "method": "x", "verified": True}
            ),
        )
    reopened = Storage(tmp_path)
    assert reopened.best_bound(mid).lipschitz_bound == 36.5
    assert reopened.bound_for_job(mid, "j").method == "lipsdp-neuron"
    assert reopened.bound_for_job(mid, "other") is None
    assert [b.lipschitz_bound for b in reopened.list_bounds(mid)] == [40.0, 1.0, 36.5]
    net = reopened.load_network(mid)
    assert net.input_size == 2 and net.output_size == 2
    assert reopened.delete_model(mid)
    assert reopened.get_model(mid) is None and reopened.list_bounds(mid) == []
    assert list((tmp_path / "models").glob("*.bin")) == []
    assert not reopened.delete_model(mid)
    with pytest.raises(KeyError):
        reopened.load_network(mid)


def test_concurrent_writers(tmp_path, onnx_bytes) -> None:
    s = Storage(tmp_path)
    mid = s.save_model(onnx_bytes).id
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(20):
                s.save_bound(
                    mid,
                    StoredBound.from_json(
                        {"lipschitz_bound": 100.0 + k * 20 + i, "method": "naive", "verified": True}
                    ),
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(s.list_bounds(mid)) == 80
    assert s.best_bound(mid).lipschitz_bound == 100.0


def test_a_bound_for_a_deleted_model_is_not_stored(tmp_path, onnx_bytes) -> None:
    """A job that ends after its model was deleted must not leave an orphan bound that would
    reappear when the same bytes are uploaded again (found by review)."""
    s = Storage(tmp_path)
    mid = s.save_model(onnx_bytes).id
    doc = {"lipschitz_bound": 40.0, "method": "lipsdp-layer", "verified": True}
    assert s.save_bound(mid, StoredBound.from_json(doc)) is True
    assert s.delete_model(mid)
    assert s.save_bound(mid, StoredBound.from_json(doc)) is False
    assert s.save_model(onnx_bytes).id == mid  # the same bytes again: the same id, no bounds
    assert s.list_bounds(mid) == [] and s.best_bound(mid) is None


def test_bounds_of_another_network_are_never_used(tmp_path, onnx_bytes) -> None:
    """Found by review: a database written before an importer fix kept using a bound certified
    for what the old importer made of the file (an ONNX Cast read as -1 where onnxruntime
    computes 255: radii 255x too large). Opening the store re-imports each model; only bounds
    whose certificate names the network the file imports to now are used; a bound that
    records no network is not trusted either."""
    import json
    import sqlite3

    from sdp.importers import load_model

    now = load_model(onnx_bytes).content_hash()
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    mid = sha[:16]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / f"{sha}.bin").write_bytes(onnx_bytes)
    db = sqlite3.connect(tmp_path / "lipcert.sqlite3")
    db.executescript(OLD_TABLES)
    db.execute(
        "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (mid, sha, "m.onnx", "onnx", "feedforward", "[2]", "[2]", 2, 1, 1, "t"),
    )
    legacy = [("stale", 1.0, "0" * 64), ("current", 40.0, now), ("none", 2.0, None)]
    for job, value, cert_hash in legacy:
        doc = {"lipschitz_bound": value, "method": "lipsdp-neuron", "verified": True, "job_id": job}
        if cert_hash is not None:
            doc["certificate"] = {"rho": value**2, "multipliers": [], "network_hash": cert_hash}
        db.execute(
            "INSERT INTO bounds (model_id, job_id, method, value, verified, created_at, result)"
            " VALUES (?,?,?,?,?,?,?)",
            (mid, job, "lipsdp-neuron", value, 1, "t", json.dumps(doc)),
        )
    db.commit()
    db.close()
    s = Storage(tmp_path)
    assert s.best_bound(mid) is None  # not re-imported yet: no bound is trusted
    assert s.reimport_stale_models(ModelChecker(60.0).parse) == {mid: "ok"}
    best = s.best_bound(mid)
    assert best is not None and best.job_id == "current"
    assert [b.job_id for b in s.list_bounds(mid)] == ["current"]
    assert s.bound_for_job(mid, "stale") is None and s.bound_for_job(mid, "none") is None
    # new bounds: recorded for the network they name, else for the model's current one
    other = {"lipschitz_bound": 0.5, "method": "x", "verified": True, "network_hash": "f" * 64}
    assert s.save_bound(mid, StoredBound.from_json(other))
    assert s.save_bound(
        mid, StoredBound.from_json({"lipschitz_bound": 30.0, "method": "naive", "verified": True})
    )
    best = s.best_bound(mid)
    assert best is not None and best.lipschitz_bound == 30.0
    assert Storage(tmp_path).best_bound(mid) == best  # reopened: nothing re-imported again
