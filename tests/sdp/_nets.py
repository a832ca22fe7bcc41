"""Small network builders shared by the bounds tests (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from sdp.certificate import Lmi
from sdp.ir import Activation, Dense, Network


def mat_network(path: Path, activation: str = "relu", param: float = 0.0) -> Network:
    """A LipSDP .mat weight file (no biases) as a Network, built by hand."""
    ws = [np.asarray(w, dtype=np.float64) for w in scipy.io.loadmat(path)["weights"].ravel()]
    return dense_network(ws, activation, param)


def dense_network(
    weights: list[np.ndarray],
    activation: str = "relu",
    param: float = 0.0,
    biases: list[np.ndarray] | None = None,
) -> Network:
    ops: list = []
    for i, w in enumerate(weights):
        b = np.zeros(w.shape[0]) if biases is None else biases[i]
        ops.append(Dense(w, b))
        if i < len(weights) - 1:
            ops.append(Activation(activation, param))  # type: ignore[arg-type]
    return Network((weights[0].shape[1],), tuple(ops))


def random_network(
    rng: np.random.Generator, sizes: list[int], activation: str = "relu", param: float = 0.0
) -> Network:
    ws = [
        rng.standard_normal((sizes[i + 1], sizes[i])) / np.sqrt(sizes[i])
        for i in range(len(sizes) - 1)
    ]
    bs = [0.1 * rng.standard_normal(s) for s in sizes[1:]]
    return dense_network(ws, activation, param, bs)


def random_lmi(sizes: list[int], act: Activation, seed: int) -> Lmi:
    """LipSDP data of a random N(0, 1) chain with ``act``'s slope bounds on every neuron."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(len(sizes) - 1)]
    a, b = act.slope_bounds
    return Lmi(
        tuple(ws),
        tuple(np.full(w.shape[0], a) for w in ws[:-1]),
        tuple(np.full(w.shape[0], b) for w in ws[:-1]),
    )


def spd_and_direction(seed: int, n: int, shift: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A step-length problem of size ``n``: S = A A^T / n + shift I (positive definite) and a
    symmetric direction D = (B + B^T) / 2, A and B standard normal."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    s = a @ a.T / n + shift * np.eye(n)
    b = rng.standard_normal((n, n))
    return s, (b + b.T) / 2
