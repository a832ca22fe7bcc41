"""The API's re-check of a certification chunk from an RQ worker (service.jobs.certify_check).

Honest chunks come back with exactly the worker's columns; a doctored chunk (radius column
inflated, certificate epsilon inflated, certificate of another input, garbage bytes) gives
no radius beyond what the API proves itself (the global floor), and never raises.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdp.bounds import naive_bound
from sdp.ir import Network
from service.jobs.certify import CertifyOptions, certify_chunk, npz
from service.jobs.certify_check import CERT, read_certificates, recheck_batch
from service.jobs.certify_rq import split_chunks
from tests.sdp._local_nets import dense_net


def _setup(
    method: str,
    epsilon: float | None,
    rows: int = 8,
    chunk: int = 4,
    sizes: tuple[int, ...] = (4, 16, 16, 3),
    act: str = "relu",
) -> tuple[Network, dict[str, np.ndarray], CertifyOptions]:
    rng = np.random.default_rng(3)
    net = dense_net(rng, list(sizes), act, scale=3.0 if act != "relu" else 1.0)
    lip = float(naive_bound(net)[0])
    x = rng.normal(size=(rows, 4))
    labels = np.argmax(net.forward(x), axis=1).astype(np.int64)
    labels[1] = (labels[1] + 1) % 3  # one misclassified input
    opts = CertifyOptions.new(
        rows=rows,
        chunk_rows=chunk,
        workers=1,
        method=method,
        time_budget_s=2.0,
        epsilon=epsilon,
        lipschitz=lip,
    )
    return net, {"x": x, "labels": labels}, opts


def _worker_parts(
    net: Network, inputs: dict[str, np.ndarray], opts: CertifyOptions
) -> list[dict[str, np.ndarray]]:
    return [certify_chunk(net, inputs, opts, a, b, certificates=True) for a, b in opts.chunks()]


COLUMNS = (
    "prediction",
    "margin",
    "radius",
    "radius_method",
    "global_radius",
    "label",
    "correct",
    "certified",
)


@pytest.mark.parametrize(
    ("method", "epsilon"),
    [("crown", None), ("alpha-crown", 0.05), ("beta-crown", 0.1), ("bab", 0.1), ("ibp", None)],
)
def test_honest_chunks_are_reproduced(method: str, epsilon: float | None) -> None:
    net, inputs, opts = _setup(method, epsilon)
    parts = _worker_parts(net, inputs, opts)
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 0
    for got, sent in zip(checked, parts, strict=True):
        for name in COLUMNS + (("epsilon",) if epsilon is not None else ()):
            assert got[name].tolist() == sent[name].tolist(), name
    # something was certified beyond the floor by a local method (the check is not vacuous)
    methods = {m for p in parts for m in p["radius_method"].tolist()}
    assert method in methods, methods


def test_sigmoid_tangent_certificates_survive_the_bundle() -> None:
    """alpha-crown certificates of a sigmoid net carry packed intermediate tangent slopes
    (uint8 masks, float16 slopes): through a worker's npz bundle they re-verify as sent."""
    net, inputs, opts = _setup("alpha-crown", 0.3, sizes=(4, 12, 12, 12, 3), act="sigmoid")
    parts = _worker_parts(net, inputs, opts)
    bundle = npz({f"c{k}/{name}": arr for k, p in enumerate(parts) for name, arr in p.items()})
    back = split_chunks(bundle, len(opts.chunks()))
    kinds = {str(a.dtype) for p in back if p for k, a in p.items() if "/tsm:" in k or "/tsl:" in k}
    assert kinds == {"uint8", "float16"}, kinds
    checked, refused = recheck_batch(net, inputs, opts, back)
    assert refused == 0
    for got, sent in zip(checked, parts, strict=True):
        for name in (*COLUMNS, "epsilon"):
            assert got[name].tolist() == sent[name].tolist(), name
    assert any(m == "alpha-crown" for p in parts for m in p["radius_method"].tolist())


def test_global_certificates_of_a_batch_re_check_and_a_forged_one_is_refused() -> None:
    """Global certificates are re-proved like the others (no skip: since sdp.local's floor is
    the min of the batch's and each row's own pass, verify_local accepts a batch's global
    certificates); one for another input is refused, its row keeps the API's own floor."""
    net, inputs, opts = _setup("ibp", None, rows=12, chunk=12, sizes=(4, 32, 32, 32, 3))
    parts = _worker_parts(net, inputs, opts)
    methods = parts[0][CERT + "method"].tolist()
    glob = [i for i, m in enumerate(methods) if m == "global"]
    assert len(glob) >= 6, methods
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 0
    assert checked[0]["radius"].tolist() == parts[0]["radius"].tolist()
    i = glob[0]
    ih = parts[0][CERT + "input_hash"]
    ih[i] = ih[(i + 1) % len(ih)]  # another input's certificate, epsilon within the floor
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 1
    assert checked[0]["radius"][i] == checked[0]["global_radius"][i] > 0


def test_inflated_radius_column_is_ignored() -> None:
    net, inputs, opts = _setup("crown", None)
    parts = _worker_parts(net, inputs, opts)
    honest = [p["radius"].copy() for p in parts]
    for p in parts:
        p["radius"] = p["radius"] * 10 + 1.0
        p["certified"] = np.ones_like(p["certified"])
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 0
    assert [c["radius"].tolist() for c in checked] == [h.tolist() for h in honest]
    assert not checked[0]["certified"][1]  # the misclassified input stays uncertified


def test_tampered_certificates_fall_back_to_the_floor() -> None:
    net, inputs, opts = _setup("crown", None)
    parts = _worker_parts(net, inputs, opts)
    local = [i for i, m in enumerate(parts[0]["radius_method"].tolist()) if m == "crown"]
    assert len(local) >= 2, parts[0]["radius_method"]
    a, b = local[:2]
    eps = parts[0][CERT + "epsilon"]
    eps[a] = eps[a] * 100  # a radius the bounds do not support
    parts[0]["radius"][a] = eps[a]
    ih = parts[0][CERT + "input_hash"]
    ih[b] = ih[(b + 1) % len(ih)]  # another input's certificate
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 2
    row = checked[0]
    for i in (a, b):
        assert row["radius"][i] == row["global_radius"][i] > 0
        assert row["radius_method"][i] == "global"
    others = [i for i in range(4) if i not in (a, b)]
    assert row["radius"][others].tolist() == parts[0]["radius"][others].tolist()


def test_certified_at_eps_needs_a_verified_certificate() -> None:
    net, inputs, opts = _setup("crown", 0.05)
    parts = _worker_parts(net, inputs, opts)
    eps_col = parts[0][CERT + "method"]
    crown = [i for i, m in enumerate(eps_col.tolist()) if m == "crown"]
    assert crown, eps_col
    i = crown[0]
    parts[0][CERT + "network_hash"][i] = "0" * 64  # a certificate for another network
    checked, refused = recheck_batch(net, inputs, opts, list(parts))
    assert refused == 1
    row = checked[0]
    assert bool(row["certified"][i]) == bool(row["global_radius"][i] > 0.05)
    assert row["radius"][i] == row["global_radius"][i]


def test_garbage_from_a_worker_never_raises() -> None:
    net, inputs, opts = _setup("crown", None)
    honest = _worker_parts(net, inputs, opts)
    for data in (b"not an npz", None, npz({"c0/cert_method": np.array(["crown"])})):
        parts = split_chunks(data, len(opts.chunks()))
        checked, refused = recheck_batch(net, inputs, opts, parts)
        assert refused == opts.rows
        for got, sent in zip(checked, honest, strict=True):
            assert got["radius"].tolist() == sent["global_radius"].tolist()
    # a payload array of the wrong shape is refused by verify_local, not an exception
    bad = {**honest[0]}
    bad.update({k: np.zeros((1, 1)) for k in bad if k.startswith("payload/")})
    assert read_certificates(bad, 4)[0] is not None
