"""Benchmark: deep random ReLU chains, verified eclipse-fast vs eclipse-nn ECLipsE-Fast and naive.

Usage (from the repository root; one BLAS thread, as the machine is shared):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD \
        .venv/bin/python bench/bench_deep.py [--shapes 100x80 50x50] [--seed 0] [--json OUT]

For each shape L x n (L hidden layers of n ReLU neurons, input n, 10 outputs; weights
N(0, 1/fan_in), biases 0.1 N(0, 1), the project's random test nets): our verified eclipse-fast
bound (:func:`sdp.bounds.compute_bound` with ``method="eclipse-fast"``: closed-form multipliers,
certified by :func:`sdp.certificate.certify_rho`) and its wall time, the naive product, the
empirical lower bound, and - if the optional ``eclipse-nn`` package (0.1.7, not a project
dependency: ``pip install --no-deps eclipse-nn==0.1.7``) imports - its ECLipsE-Fast value and
time on the same weights in the same run (an unverified float number, printed for comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine_info import git_commit, run_line

from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.certificate import verify_on
from sdp.ir import Activation, Dense, Network

try:  # optional, benchmark only (not a project dependency)
    import torch
    from eclipse_nn import LipConstEstimator
except ImportError:
    torch = None  # type: ignore[assignment]


def random_chain(depth: int, width: int, seed: int, n_out: int = 10) -> Network:
    """``depth`` hidden ReLU layers of ``width`` neurons, input ``width``, ``n_out`` outputs."""
    rng = np.random.default_rng(seed)
    sizes = [width] * (depth + 1) + [n_out]
    ops: list[Any] = []
    for i in range(len(sizes) - 1):
        w = rng.standard_normal((sizes[i + 1], sizes[i])) / np.sqrt(sizes[i])
        ops.append(Dense(w, 0.1 * rng.standard_normal(sizes[i + 1])))
        if i < len(sizes) - 2:
            ops.append(Activation("relu"))
    return Network((width,), tuple(ops))


def eclipse_nn_fast(net: Network) -> tuple[float, float] | None:
    """(value, seconds) of eclipse-nn's ECLipsE-Fast on ``net``'s weights; None if not installed."""
    if torch is None:
        return None
    ws = [torch.tensor(op.weight) for op in net.ops if isinstance(op, Dense)]
    t0 = time.perf_counter()
    value = float(LipConstEstimator(weights=ws).estimate("ECLipsE_Fast"))
    return value, time.perf_counter() - t0


def run_shape(depth: int, width: int, seed: int) -> dict[str, Any]:
    net = random_chain(depth, width, seed)
    t0 = time.perf_counter()
    res = compute_bound(net, "eclipse-fast", lower_bound=False)
    ours_s = time.perf_counter() - t0
    assert res.certificate is not None and verify_on(net, res.certificate)
    naive = compute_bound(net, "naive", lower_bound=False).value
    t1 = time.perf_counter()
    low = empirical_lower_bound(net, starts=16)
    low_s = time.perf_counter() - t1
    ref = eclipse_nn_fast(net)
    return {
        "shape": f"{depth}x{width}",
        "ours_verified": res.value,
        "ours_s": ours_s,
        "ours_timings": res.timings,
        "closed_form_unverified": float(np.sqrt(res.certificate.meta["closed_form_rho"])),
        "eclipse_nn_fast": None if ref is None else ref[0],
        "eclipse_nn_fast_s": None if ref is None else ref[1],
        "naive": naive,
        "lower_bound": low,
        "lower_bound_s": low_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["100x80", "50x50"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    commit = git_commit()
    print(run_line(), flush=True)
    rows = []
    for shape in args.shapes:
        depth, width = (int(x) for x in shape.split("x"))
        row = run_shape(depth, width, args.seed)
        rows.append(row)
        ref, ref_s = row["eclipse_nn_fast"], row["eclipse_nn_fast_s"]
        theirs = "n/a" if ref is None else f"{ref:.6e} ({ref_s:.2f} s)"
        print(
            f"{row['shape']:>7}: ours {row['ours_verified']:.6e} (verified, {row['ours_s']:.2f} s)"
            f" | eclipse-nn Fast {theirs} | naive {row['naive']:.6e}"
            f" | lower {row['lower_bound']:.6e}"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB; load average after {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
