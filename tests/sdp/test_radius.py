"""Certified radii: the formula, and no adversarial example inside the radius (l2 PGD)."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from sdp.bounds import compute_bound
from sdp.bounds.lower import vector_jacobian
from sdp.radius import certified_accuracy, certified_radius
from sdp.report import plot_certified_accuracy, write_tsv
from tests.sdp._nets import mat_network


def test_radius_formula_matches_independent_loop():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 5))
    logits[3] = [1.0, 1.0, 0.0, 0.0, 0.0]  # tie: margin 0
    lip = 2.5
    res = certified_radius(logits, lip, labels=rng.integers(0, 5, 50))
    for i, f in enumerate(logits):
        y = max(range(5), key=lambda k: f[k])
        m = f[y] - max(f[j] for j in range(5) if j != y)
        assert res.prediction[i] == y
        assert res.margin[i] == pytest.approx(m)
        assert res.radius[i] == pytest.approx(max(m, 0.0) / (math.sqrt(2) * lip))
    assert res.radius[3] == 0.0


def test_pairwise_radius_and_accuracy():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5], [1.0, 0.0, 5.0]])
    pw = np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 0.5], [4.0, 0.5, 0.0]])
    res = certified_radius(logits, 2.0, labels=np.array([0, 1, 1]), pairwise=pw)
    assert res.radius_pairwise == pytest.approx([min(2 / 1, 3 / 4), 0.5 / 0.5, min(4 / 4, 5 / 0.5)])
    assert list(res.correct) == [True, True, False]
    acc = certified_accuracy(res.best_radius, res.correct, [0.0, 0.8, 1.0])
    assert acc == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_margin_nonpositive_gives_zero_and_inputs_checked():
    res = certified_radius(np.array([[1.0, 1.0]]), 1.0)
    assert res.radius[0] == 0.0
    with pytest.raises(ValueError):
        certified_radius(np.array([[1.0, 0.0]]), 0.0)
    with pytest.raises(ValueError):
        certified_radius(np.array([[1.0, 0.0]]), 1.0, labels=np.array([0, 1]))


def _pgd_flips(net, x, label, radius, steps=200, restarts=3, seed=0) -> bool:
    """l2 PGD on max_{j != y} f_j - f_y inside the ball; True if the class changes."""
    rng = np.random.default_rng(seed)
    n = x.size
    for _ in range(restarts):
        d = rng.standard_normal(n)
        d *= radius * rng.uniform() / np.linalg.norm(d)
        step = radius / 10
        for _ in range(steps):
            f = net.forward((x + d)[None])[0]
            if int(np.argmax(f)) != label:
                return True
            other = int(np.argmax(np.where(np.arange(f.size) == label, -np.inf, f)))
            u = np.zeros((1, f.size))
            u[0, other], u[0, label] = 1.0, -1.0
            g = vector_jacobian(net, (x + d)[None], u)[0]
            d = d + step * g / max(np.linalg.norm(g), 1e-12)
            nd = np.linalg.norm(d)
            if nd > radius:
                d *= radius / nd
            step *= 0.98
        if int(np.argmax(net.forward((x + d)[None])[0])) != label:
            return True
    return False


def _mnist_images(fixtures_dir, idx):
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(fixtures_dir / "mnist" / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)
    return raw[idx] / 255.0, labels[idx].astype(int)


def test_no_adversarial_example_inside_radius_random_weights(fixtures_dir):
    net = mat_network(fixtures_dir / "lipsdp" / "random_weights.mat")
    bound = compute_bound(net, "lipsdp-neuron", lower_bound=False)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 2))
    res = certified_radius(net.forward(x), bound.value)
    for i in range(6):
        if res.radius[i] > 0:
            assert not _pgd_flips(net, x[i], int(res.prediction[i]), res.radius[i] * 0.999)


def test_no_adversarial_example_inside_radius_mnistfc(fixtures_dir):
    from sdp.importers import load_model_file

    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path)
    bound = compute_bound(net, "naive", lower_bound=False)
    x, y = _mnist_images(fixtures_dir, np.arange(4))
    res = certified_radius(net.forward(x), bound.value, labels=y)
    assert res.correct.all()
    for i in range(4):
        assert res.radius[i] > 0
        assert not _pgd_flips(net, x[i], int(y[i]), res.radius[i] * 0.999, steps=100, restarts=2)
    # the attack is real: at an l2 radius of 3 (pixels in [0, 1]) it flips these digits
    assert any(_pgd_flips(net, x[i], int(y[i]), 3.0, steps=100, restarts=1) for i in range(4))


def test_report_tsv_and_plot(tmp_path):
    res = certified_radius(np.array([[2.0, 0.0], [0.0, 1.0]]), 1.0, labels=np.array([0, 0]))
    write_tsv(tmp_path / "r.tsv", res, np.array([0, 0]))
    lines = (tmp_path / "r.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct"]
    row = lines[1].split("\t")
    assert row[:3] == ["0", "0", "0"] and float(row[3]) == pytest.approx(2 / math.sqrt(2))
    assert lines[2].split("\t")[4] == "0"
    plot_certified_accuracy(tmp_path / "p.png", res)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
