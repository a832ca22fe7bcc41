"""No attack finds an adversarial example inside a locally certified radius (PGD, torch float64).

Random nets of every activation and depth, conv and residual nets, and the real VNN-COMP
mnistfc-256x2 network on MNIST test images.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from models.runtime import TorchNetwork
from sdp.importers import Limits, load_model_file
from sdp.ir import Network
from sdp.local import certify_local, verify_local
from tests.sdp._local_nets import ACT_NAMES, conv_net, dense_net, residual_net

torch.set_num_threads(1)


def pgd_min_margin(
    net: Network,
    x0: np.ndarray,
    y: np.ndarray,
    eps: np.ndarray,
    steps: int = 40,
    restarts: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Smallest margin f_y - max_{j != y} f_j found by l2 PGD inside each closed ball."""
    tnet = TorchNetwork.from_network(net, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x0t = torch.as_tensor(x0)
    yt = torch.as_tensor(y)
    et = torch.as_tensor(eps)[:, None]
    best = torch.full((x0.shape[0],), np.inf, dtype=torch.float64)

    def margin(x: torch.Tensor) -> torch.Tensor:
        f = tnet(x)
        fy = f.gather(1, yt[:, None])[:, 0]
        other = f.clone()
        other[torch.arange(len(yt)), yt] = -torch.inf
        return fy - other.max(dim=1).values

    def project(d: torch.Tensor) -> torch.Tensor:
        n = d.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return d * torch.clamp(et / n, max=1.0)

    for r in range(restarts):
        d = torch.randn(x0t.shape, generator=gen, dtype=torch.float64)
        d = project(d * et / d.norm(dim=1, keepdim=True) * (0.0 if r == 0 else 1.0))
        for _ in range(steps):
            d.requires_grad_(True)
            m = margin(x0t + d)
            best = torch.minimum(best, m.detach())
            (g,) = torch.autograd.grad(m.sum(), d)
            gn = g.norm(dim=1, keepdim=True).clamp_min(1e-30)
            d = project(d.detach() - 0.25 * et * g / gn)
        best = torch.minimum(best, margin(x0t + d).detach())
    return best.numpy()


def check_no_attack(net: Network, x: np.ndarray, *, method: str = "auto", budget: float = 1.0):
    res = certify_local(net, x, method=method, time_budget_s=budget)
    r = res.radius
    assert np.all(r >= 0)
    mask = r > 0
    assert mask.any(), "nothing was certified: the test would be vacuous"
    # attack inside the certified closed ball (a hair inside, for the float projection)
    m = pgd_min_margin(net, x[mask], res.prediction[mask], r[mask] * (1 - 1e-9))
    assert np.all(m > 0), (m, r[mask])
    # ... and slightly outside it something may break: not asserted (the bound is not exact)
    for i in np.flatnonzero(mask)[:3]:
        assert verify_local(net, x[i], res.certificates[i])
    return res


@pytest.mark.parametrize("name", ACT_NAMES)
@pytest.mark.parametrize("depth", [1, 3])
def test_pgd_inside_radius_random_dense(name, depth):
    """0.3 s per input: the radii (and the methods that certified them: beta-crown on ReLU
    and leaky ReLU, alpha-crown on some sigmoid / tanh inputs) are those of 1 s but for a
    few smaller ones; 1 s cost 2.4x the CPU time over the 18 cases."""
    rng = np.random.default_rng(100 + depth * 17 + ACT_NAMES.index(name))
    net = dense_net(rng, [8] + [16] * depth + [4], name, scale=1.5)
    check_no_attack(net, rng.normal(size=(6, 8)), budget=0.3)


@pytest.mark.parametrize("maker", [conv_net, residual_net], ids=["conv", "residual"])
@pytest.mark.parametrize("name", ["relu", "tanh", "gelu"])
def test_pgd_inside_radius_conv_and_residual(maker, name):
    rng = np.random.default_rng(7)
    net = maker(rng, name)
    check_no_attack(net, rng.normal(size=(5, net.input_size)))


def _mnist(fixtures_dir, n):
    with gzip.open(fixtures_dir / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(fixtures_dir / "mnist" / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return raw[:n] / 255.0, labels[:n].astype(np.int64)


def test_mnistfc_256x2_radius_beats_global_and_survives_pgd(fixtures_dir):
    path = fixtures_dir / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"
    net = load_model_file(path, limits=Limits(max_parameters=10_000_000))
    x, y = _mnist(fixtures_dir, 6)
    res = certify_local(net, x, labels=y, global_bound=312.416, method="crown", time_budget_s=3.0)
    assert np.all(res.radius >= res.global_radius)
    ok = res.correct & (res.radius > 0)
    # the global radius is ~0.002; CROWN certifies radii of order 0.1-0.4 on these images
    assert np.median(res.radius[ok]) > 20 * np.median(res.global_radius[ok])
    m = pgd_min_margin(net, x[ok], res.prediction[ok], res.radius[ok] * (1 - 1e-9), steps=30)
    assert np.all(m > 0)
    at = certify_local(net, x, labels=y, epsilon=0.1, method="auto")
    assert at.certified is not None and at.certified[at.correct].mean() >= 0.8
    for i in range(2):
        assert verify_local(net, x[i], at.certificates[i])
