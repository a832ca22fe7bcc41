"""Branch and bound on last-layer ReLUs over SDP-CROWN (sdp.local.bab)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from sdp.importers import load_model_file
from sdp.local import LocalCertificate, certify_local, verify_local
from sdp.local import bab as B
from sdp.local import sdp_crown as S
from tests.sdp._local_nets import dense_net
from tests.sdp.test_local_attack import pgd_min_margin


def test_covers_checks_a_complete_split_tree():
    full = [((3, 1), (5, 1)), ((3, 1), (5, -1)), ((3, -1),)]
    assert B._covers(full)
    assert B._covers([()])
    assert not B._covers(full[:2])  # the z_3 <= 0 part is missing
    assert not B._covers([((3, 1),), ((3, 1),)])  # two leaves on the same side
    assert not B._covers([((3, 1), (3, -1)), ((3, -1),)])  # a neuron split twice
    assert not B._covers([])


def _hard_case():
    rng = np.random.default_rng(31)
    net = dense_net(rng, [6, 24, 24, 3], "relu", scale=1.6)
    x = rng.normal(size=(10, 6))
    return net, x


def test_bab_at_least_sdp_crown_and_rechecks():
    net, x = _hard_case()
    layers = S.layers_of(net)
    eps = 0.35
    pred = np.argmax(net.forward(x), axis=1)
    for i in (1, 5):  # SDP-CROWN leaves a margin row negative on these
        sdp, _ = S.margin_lower_bounds(layers, x[i], eps, int(pred[i]))
        assert np.min(sdp) <= 0
        bb, rec, trees = B.bab_margin_bounds(layers, x[i], eps, int(pred[i]), branches=6)
        assert trees  # it branched
        assert np.all(bb >= sdp)
        assert np.array_equal(B.recheck_bab(layers, x[i], eps, int(pred[i]), rec, trees), bb)


def _mnist(fixtures_dir, idx):
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    return raw[idx] / 255.0


@pytest.mark.slow
def test_bab_certifies_beyond_sdp_crown_on_mnistfc(fixtures_dir):
    """Test image 6 at eps 0.3: SDP-CROWN's bound stays negative, branching proves it; no
    attack breaks it, the certificate verifies, and without one leaf it does not."""
    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path)
    x = _mnist(fixtures_dir, [6])
    sdp = certify_local(net, x, epsilon=0.3, method="sdp-crown")
    res = certify_local(net, x, epsilon=0.3, method="bab")
    assert not sdp.certified[0] and res.certified[0]
    assert pgd_min_margin(net, x, res.prediction, np.array([0.3]))[0] > 0
    cert = res.certificates[0]
    assert verify_local(net, x[0], cert)
    leaves = [k for k, _ in cert.payload if k.endswith(":split")]
    assert len(leaves) >= 2
    prefix = leaves[-1][: -len("split")]
    fields = dict(cert.__dict__)
    fields["payload"] = tuple((k, v) for k, v in cert.payload if not k.startswith(prefix))
    assert not verify_local(net, x[0], LocalCertificate(**fields))
