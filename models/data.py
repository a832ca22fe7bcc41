"""Datasets for training: MNIST IDX files (optionally gzip) and ``.npz`` (never unpickled).

IDX format (LeCun et al.): big-endian magic ``0x00 0x00 <dtype> <ndim>``, ndim big-endian uint32
dimension sizes, then the data in C order. Images are returned as float32 in [0, 1]
(pixel / 255), labels as int64.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
MAX_BYTES = 2**31


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed). Raises ValueError for malformed files."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise ValueError(f"{p.name}: not an IDX file")
        ndim = head[3]
        dims = np.frombuffer(f.read(4 * ndim), dtype=">u4").astype(np.int64)
        if dims.size != ndim:
            raise ValueError(f"{p.name}: truncated IDX header")
        dtype = np.dtype(_IDX_DTYPES[head[2]])
        count = int(np.prod(dims)) if ndim else 0
        if count * dtype.itemsize > MAX_BYTES:
            raise ValueError(f"{p.name}: IDX data too large")
        data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{p.name}: truncated IDX data")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(d) for d in dims))


def _find(folder: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}[.gz] in {folder}")


def load_mnist_idx(folder: str | Path, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64) of an MNIST split."""
    folder = Path(folder)
    images = read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError("MNIST images and labels do not match")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(x float32, y int64) from an ``.npz`` with arrays ``x`` and ``y`` (allow_pickle=False).

    Integer images (uint8) are scaled by 1/255.
    """
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        xk = next((k for k in ("x", "X", "images", "x_train") if k in keys), None)
        yk = next((k for k in ("y", "Y", "labels", "y_train") if k in keys), None)
        if xk is None or yk is None:
            raise ValueError(f"{Path(path).name}: needs arrays 'x' and 'y', has {sorted(keys)}")
        x, y = z[xk], z[yk]
    if x.dtype.kind in "ui":
        x = x.astype(np.float32) / 255.0
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y have different lengths")
    return x.astype(np.float32), y.astype(np.int64).ravel()


def load_dataset(path: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """An ``.npz`` file, or the ``split`` (train or t10k) of an IDX folder.

    Raises FileNotFoundError when the folder lacks that split (never falls back to another
    one: training on the test split must be asked for).
    """
    p = Path(path)
    if p.is_dir():
        return load_mnist_idx(p, split)
    if p.suffix == ".npz":
        return load_npz(p)
    raise ValueError(f"{p}: expected an .npz file or a folder of IDX files")
