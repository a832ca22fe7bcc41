"""IDX (MNIST) and npz readers."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from models.data import load_dataset, load_mnist_idx, load_npz, read_idx


def test_mnist_t10k(fixtures_dir):
    x, y = load_mnist_idx(fixtures_dir / "mnist", "t10k")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels
    x2, _ = load_dataset(fixtures_dir / "mnist", split="t10k")
    assert x2.shape == x.shape
    with pytest.raises(FileNotFoundError, match="train-images"):  # no silent fallback to t10k
        load_dataset(fixtures_dir / "mnist")


def _idx(data: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    return head + data.tobytes()


def test_idx_round_trip_and_malformed(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(_idx(arr, 0x08)[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "c")


def test_npz_scaling_and_no_pickle(tmp_path):
    np.savez(tmp_path / "u8.npz", x=np.full((3, 2), 255, np.uint8), y=np.array([0, 1, 1]))
    x, y = load_npz(tmp_path / "u8.npz")
    assert x.dtype == np.float32 and x.max() == 1.0 and y.dtype == np.int64
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object), y=np.zeros(2))
    with pytest.raises(ValueError):
        load_npz(tmp_path / "obj.npz")
