"""Structured LipSDP solver: numpy backend against torch backends, interleaved, one table.

    PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python bench/bench_backends.py --nets mnistfc-256x2 --device cpu --rounds 2

Backends per round (the order alternates between rounds): ``numpy`` (LAPACK, block-tridiagonal
S, ARPACK step lengths), ``torch-block`` (models.lipsdp_device.TorchOps on ``--device``: block
S, torch Lanczos on block solves; Z's step length a dense eigenvalue), ``torch-block-lz`` (also
Z's step length by torch Lanczos) and ``torch-dense`` (dense S as before issue 13). Every
bound is certified on the host in float64 (sdp.certificate.certify_multipliers); the table
gives iterations, certified bound, its relative difference to numpy's, wall and CPU seconds of
the solve. Networks as in bench/bench_fast_lipsdp.py (``LIPCERT_FIXTURES``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_fast_lipsdp import networks
from models.lipsdp_device import TorchOps
from sdp.certificate import certify_multipliers
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.structured import StructuredSolver

BACKENDS = ("numpy", "torch-block", "torch-block-lz", "torch-dense")


def solver(backend: str, device: str) -> StructuredSolver:
    if backend == "numpy":
        return StructuredSolver()
    return StructuredSolver(
        TorchOps(
            device,
            block_tridiag=backend != "torch-dense",
            lanczos_above=300 if backend.endswith("-lz") else None,
        )
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(name: str, backend: str, device: str, lmi: Any) -> dict[str, Any]:
    s = solver(backend, device)
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    sol = s.solve(LipSdpProblem(lmi, "neuron"), SolveOptions())
    _sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    assert sol.multipliers is not None
    bound = math.sqrt(certify_multipliers(lmi, sol.multipliers).rho)
    return {
        "net": name,
        "backend": backend,
        "ran_on": sol.info.get("backend"),
        "status": sol.status,
        "iterations": sol.iterations,
        "bound": bound,
        "wall_s": wall,
        "cpu_s": cpu,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["mnistfc-256x2"])
    ap.add_argument("--device", default="cpu", help="torch device of the torch backends")
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    factories = networks()
    rows: list[dict[str, Any]] = []
    print(
        "| net | backend | ran on | iterations | certified bound | rel. to numpy | wall s | CPU s |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.nets:
        lmi = factories[name][0]()
        ref: float | None = None
        for rnd in range(args.rounds):
            order = args.backends if rnd % 2 == 0 else list(reversed(args.backends))
            for backend in order:
                try:
                    row = run(name, backend, args.device, lmi)
                except Exception as e:  # a failed backend is a row, not the end
                    row = {"net": name, "backend": backend, "error": f"{type(e).__name__}: {e}"}
                    print(f"| {name} | {backend} | failed: {row['error']} |||||")
                    rows.append(row)
                    continue
                if backend == "numpy" and ref is None:
                    ref = row["bound"]
                rel = "" if ref is None else f"{row['bound'] / ref - 1:.1e}"
                print(
                    f"| {name} | {backend} | {row['ran_on']} | {row['iterations']} | "
                    f"{row['bound']:.10g} | {rel} | {row['wall_s']:.2f} | {row['cpu_s']:.2f}",
                    flush=True,
                )
                rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
