"""The same file imports to the same float64 network whatever BLAS's thread count.

Stored bounds name the network they were computed on by its content hash, and the API, the
solver processes and the CLI import the file separately, each with its own thread settings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from models.io import convert_lbdn_jl

_HASH = (
    "import sys; from sdp.importers import load_model_file\n"
    "print(load_model_file(sys.argv[1]).content_hash())"
)


def _hash_with_threads(path: Path, threads: int) -> str:
    env = {
        "PYTHONPATH": ".",
        **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }
    out = subprocess.run(
        [sys.executable, "-c", _HASH, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.strip()


def test_sandwich_import_does_not_depend_on_blas_threads(fixtures_dir: Path, tmp_path: Path):
    # the Julia LBDN (784 inputs): its Cayley transforms differed in the last bits between
    # one and two BLAS threads (Frobenius norm, Y^T Y and the LU solves)
    path = convert_lbdn_jl(fixtures_dir / "lbdn_jl" / "lbdn_mnist_params.npz", tmp_path / "m.st")
    assert _hash_with_threads(path, 1) == _hash_with_threads(path, 2)
