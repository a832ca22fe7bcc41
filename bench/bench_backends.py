"""Structured LipSDP solver: numpy backend against torch backends, interleaved, one table.

    PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python bench/bench_backends.py --nets mnistfc-256x2 --device cpu --rounds 2

Backends per round (the order alternates between rounds): ``numpy`` (LAPACK, block-tridiagonal
S, Lanczos step lengths), ``torch-block`` (models.lipsdp_device.TorchOps on ``--device``: block
S, torch Lanczos on block solves; Z's step length a dense eigenvalue), ``torch-block-lz`` (also
Z's step length by torch Lanczos) and ``torch-dense`` (dense S as before issue 13). Every
bound is certified on the host in float64 (sdp.certificate.certify_multipliers); the table
gives iterations, certified bound, its relative difference to numpy's, wall and CPU seconds of
the solve. Networks as in bench/bench_fast_lipsdp.py (``LIPCERT_FIXTURES``), plus the oval21
conv nets ``oval21-cifar_{base,wide,deep}_kw`` (LipSDP-Neuron on the unrolled convolutions;
``--timeout`` bounds each solve, whose best iterate is then certified).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.bench_fast_lipsdp import VNN, networks
from models.lipsdp_device import TorchOps
from sdp.certificate import Lmi, certify_multipliers
from sdp.importers import load_model_file
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.structured import StructuredSolver

BACKENDS = ("numpy", "torch-block", "torch-block-lz", "torch-dense")


def lmis() -> dict[str, Callable[[], Lmi]]:
    """name -> LMI factory: bench_fast_lipsdp's networks and the oval21 conv nets."""
    out = {name: factory for name, (factory, _) in networks().items()}
    for v in ("base", "wide", "deep"):
        path = VNN / "oval21" / "nets" / f"cifar_{v}_kw.onnx"
        out[f"oval21-cifar_{v}_kw"] = lambda p=path: Lmi.from_chain(load_model_file(p).chain())
    return out


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


def _peak_mib(device: str) -> float:
    """Peak device memory of this solve (CUDA), or peak resident set of the process so far
    (CPU: a running maximum over the rows), MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(
    name: str, backend: str, device: str, lmi: Lmi, timeout: float | None = None
) -> dict[str, Any]:
    s = solver(backend, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    sol = s.solve(LipSdpProblem(lmi, "neuron"), SolveOptions(timeout_s=timeout))
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
        "peak_mib": _peak_mib(device),
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
    ap.add_argument("--timeout", type=float, default=None, help="solver time limit (s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    factories = lmis()
    rows: list[dict[str, Any]] = []
    head = "net | backend | ran on | status | iterations | certified bound | rel. to numpy"
    print(f"| {head} | wall s | CPU s | peak MiB")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.nets:
        try:
            lmi = factories[name]()
        except Exception as e:  # a missing network is a line, not the end
            print(f"| {name} | failed to load: {type(e).__name__}: {e} |", flush=True)
            continue
        ref: float | None = None
        for rnd in range(args.rounds):
            order = args.backends if rnd % 2 == 0 else list(reversed(args.backends))
            for backend in order:
                try:
                    row = run(name, backend, args.device, lmi, args.timeout)
                except Exception as e:  # a failed backend is a row, not the end
                    row = {"net": name, "backend": backend, "error": f"{type(e).__name__}: {e}"}
                    print(f"| {name} | {backend} | failed: {row['error']} |", flush=True)
                    rows.append(row)
                    _dump(args.json, rows)
                    continue
                if backend == "numpy" and ref is None:
                    ref = row["bound"]
                rel = "" if ref is None else f"{row['bound'] / ref - 1:.1e}"
                print(
                    f"| {name} | {backend} | {row['ran_on']} | {row['status']} | "
                    f"{row['iterations']} | {row['bound']:.10g} | {rel} | {row['wall_s']:.2f} | "
                    f"{row['cpu_s']:.2f} | {row['peak_mib']:.0f}",
                    flush=True,
                )
                rows.append(row)
                _dump(args.json, rows)
    return 0


def _dump(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Rewrite the JSON after every row: a run killed by its time limit keeps what it had."""
    if path is not None:
        path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
