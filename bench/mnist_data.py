"""The MNIST test set of the shared fixtures, as the benchmarks read it.

``shared/fixtures/mnist/t10k-*.gz`` next to the checkout (its README says where they come
from): the IDX files of LeCun et al.'s MNIST, a 16-byte header then 784 uint8 pixels per
image, an 8-byte header then one uint8 label per image. Imported by the scripts of bench/
from their own folder (python puts a script's folder first on sys.path).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FIX = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
"""The shared fixtures (``../shared/fixtures`` from the repository root)."""


def mnist_test(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` test images, (count, 784) float64 pixels / 255 in [0, 1], and
    their labels, (count,) int64."""
    with gzip.open(FIX / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)[:count]
    with gzip.open(FIX / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    return x.astype(np.float64) / 255.0, y.astype(np.int64)
