"""Benchmark: the structured LipSDP solver vs generic CVXPY+SCS (issue 7).

Usage (from the repository root, 2 BLAS threads as in docs/benchmarks.md):

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2 \
        .venv/bin/python bench/bench_fast_lipsdp.py [--nets NAME ...] [--no-scs] [--json OUT]
        [--device cpu|cuda|torch-cpu]

``--device cuda`` runs the structured solver's matrices on the GPU (models.lipsdp_device, every
LMI size); ``torch-cpu`` the torch backend on the CPU (to compare backends on one machine).
The solves run under the malloc thresholds of lipcert's solver processes
(:func:`service.malloc_tuning.keep_freed_memory`); ``--glibc-malloc`` keeps glibc's defaults.

For each network: solve LipSDP-Neuron with the structured solver, certify its multipliers
on the ORIGINAL (unreduced) LMI with ``certify_multipliers``, report the certified bound, the
barrier's duality gap / dual lower bound, wall time and peak RSS; on nets small enough also run
CVXPY+SCS (the generic path) in the same process and certify its multipliers the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.io

from sdp.certificate import Lmi, certify_multipliers
from sdp.errors import CertificateError
from sdp.ir import Activation, Dense, Network
from sdp.solvers._lmi_structure import reduce_input
from sdp.solvers.base import LipSdpProblem, SolveOptions
from sdp.solvers.structured import SOLVER, StructuredSolver
from service.malloc_tuning import keep_freed_memory

FIX = Path(
    os.environ.get("LIPCERT_FIXTURES", Path(__file__).resolve().parents[1] / "../shared/fixtures")
)
VNN = FIX / "vnncomp2021" / "benchmarks"


def _onnx_network(path: Path) -> Network:
    """Load a Gemm/MatMul/Relu ONNX MLP; prefers sdp.importers, else a tiny local parser."""
    try:
        from sdp.importers import load_model_file

        return load_model_file(path)
    except Exception:  # importers still being written: parse the simple MLPs directly
        pass
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            init[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
    ops: list[Any] = []
    scale = 1.0
    shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    n0 = int(np.prod([d for d in shape if d > 0]))
    for node in g.node:
        op = node.op_type
        if op == "Gemm":
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            w = init[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            b = init[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0])
            ops.append(Dense(w * scale, b))
            scale = 1.0
        elif op == "MatMul":
            ops.append(Dense(init[node.input[1]].T * scale, np.zeros(init[node.input[1]].shape[1])))
            scale = 1.0
        elif op == "Add" and ops and isinstance(ops[-1], Dense) and node.input[1] in init:
            d = ops.pop()
            ops.append(Dense(d.weight, d.bias + init[node.input[1]].ravel()))
        elif op == "Relu":
            ops.append(Activation("relu"))
        elif op == "Sigmoid":
            ops.append(Activation("sigmoid"))
        elif op == "Div":
            scale /= float(np.min(init[node.input[1]]))
        elif op in ("Sub", "Flatten", "Reshape", "Constant", "Identity"):
            pass  # Sub shifts only; shapes are flat already
        else:
            raise ValueError(f"bench parser: unsupported op {op}")
    return Network((n0,), tuple(ops), name=path.stem)


def _mat_lmi(name: str) -> Lmi:
    ws = [
        np.asarray(w, np.float64)
        for w in scipy.io.loadmat(FIX / "lipsdp" / name)["weights"].ravel()
    ]
    return Lmi(
        tuple(ws),
        tuple(np.zeros(w.shape[0]) for w in ws[:-1]),
        tuple(np.ones(w.shape[0]) for w in ws[:-1]),
    )


def _random_lmi(sizes: list[int], seed: int = 0) -> Lmi:
    rng = np.random.default_rng(seed)
    ws = [
        rng.standard_normal((sizes[i + 1], sizes[i])) / math.sqrt(sizes[i])
        for i in range(len(sizes) - 1)
    ]
    return Lmi(
        tuple(ws),
        tuple(np.zeros(w.shape[0]) for w in ws[:-1]),
        tuple(np.ones(w.shape[0]) for w in ws[:-1]),
    )


def networks() -> dict[str, tuple[Any, bool]]:
    """name -> (lazy LMI factory, run generic SCS too)."""

    def onnx_lmi(rel: str) -> Any:
        return lambda: Lmi.from_chain(_onnx_network(VNN / rel).chain())

    return {
        "lipsdp-random_weights": (lambda: _mat_lmi("random_weights.mat"), True),
        "lipsdp-mnist_weights": (lambda: _mat_lmi("mnist_weights.mat"), True),
        "random-784-64-64-10": (lambda: _random_lmi([784, 64, 64, 10]), True),
        "mnistfc-256x2": (onnx_lmi("mnistfc/mnist-net_256x2.onnx"), False),
        "mnistfc-256x4": (onnx_lmi("mnistfc/mnist-net_256x4.onnx"), False),
        "mnistfc-256x6": (onnx_lmi("mnistfc/mnist-net_256x6.onnx"), False),
        "eran-mnist_relu_9_200": (onnx_lmi("eran/nets/mnist_relu_9_200.onnx"), False),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def solver_for(device: str) -> StructuredSolver:
    """The structured solver with its matrices on ``device`` (cpu = numpy backend)."""
    if device == "cpu":
        return SOLVER
    from models.lipsdp_device import TorchOps

    return StructuredSolver(TorchOps("cpu" if device == "torch-cpu" else device))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_structured(
    lmi: Lmi, timeout_s: float | None, verbose: bool, device: str = "cpu"
) -> dict[str, Any]:
    solver = solver_for(device)
    _sync(device)
    t0 = time.perf_counter()
    prog = (
        (
            lambda d: print(
                "   ",
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in d.items()},
                flush=True,
            )
        )
        if verbose
        else None
    )
    sol = solver.solve(
        LipSdpProblem(lmi, "neuron"),
        SolveOptions(timeout_s=timeout_s, progress=prog),  # the solver default, as compute_bound
    )
    _sync(device)
    t_solve = time.perf_counter() - t0
    assert sol.multipliers is not None
    try:
        rep = certify_multipliers(lmi, sol.multipliers)
    except CertificateError as e:  # reported honestly, never replaced by the solver's rho
        return {
            "status": sol.status,
            "iterations": sol.iterations,
            "bound": None,
            "certify_note": f"certification failed: {e}",
            "solve_s": t_solve,
            "solver_rho_unverified": sol.rho,
            "lmi_size": sol.info.get("lmi_size"),
        }
    t_total = time.perf_counter() - t0
    lb = sol.info.get("lower_bound")
    return {
        "status": sol.status,
        "iterations": sol.iterations,
        "bound": math.sqrt(rep.rho),
        "certify_note": rep.note,
        "dual_lower_bound": None if lb is None else math.sqrt(max(lb, 0.0)),
        "rel_gap_bound": None
        if lb is None
        else math.sqrt(rep.rho) / math.sqrt(max(lb, 1e-300)) - 1,
        "solve_s": t_solve,
        "total_s": t_total,
        "lmi_size": sol.info.get("lmi_size"),
        "backend": sol.info.get("backend"),
    }


def run_scs(lmi: Lmi, scs_limit: float) -> dict[str, Any]:
    from sdp.solvers.cvxpy_ import CvxpySolver

    t0 = time.perf_counter()
    # the generic path gets the same exact input reduction (as sdp.bounds does)
    sol = CvxpySolver("scs").solve(
        LipSdpProblem(reduce_input(lmi), "neuron"), SolveOptions(eps=1e-6, timeout_s=scs_limit)
    )
    assert sol.multipliers is not None
    rep = certify_multipliers(lmi, sol.multipliers)
    return {
        "status": sol.status,
        "bound": math.sqrt(rep.rho),
        "certify_note": rep.note,
        "total_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="*", default=None)
    ap.add_argument("--no-scs", action="store_true")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scs-limit", type=float, default=300.0, help="SCS time limit (s)")
    ap.add_argument(
        "--force-scs", action="store_true", help="run SCS on every selected net (slow: minutes)"
    )
    ap.add_argument("--device", default="cpu", help="cpu (numpy) | cuda | torch-cpu")
    ap.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="keep glibc's malloc thresholds (lipcert's solver processes set "
        "service.malloc_tuning's, and so does this script by default)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    malloc_tuned = False if args.glibc_malloc else keep_freed_memory()
    env = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "loadavg_start": os.getloadavg(),
        "threads": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "device": args.device,
        "malloc_tuned": malloc_tuned,
    }
    if args.device != "cpu":
        import torch

        env["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(env), flush=True)
    results: dict[str, Any] = {"env": env, "nets": {}}
    for name, (make, scs_ok) in networks().items():
        if args.nets and name not in args.nets:
            continue
        lmi = make()
        row: dict[str, Any] = {"hidden": sum(lmi.hidden_sizes), "input": lmi.input_size}
        row["structured"] = run_structured(lmi, args.timeout, args.verbose, args.device)
        row["peak_rss_mb_after_structured"] = _peak_rss_mb()
        if (scs_ok or args.force_scs) and not args.no_scs:
            row["scs"] = run_scs(lmi, args.scs_limit)
            row["speedup_vs_scs"] = row["scs"]["total_s"] / row["structured"]["total_s"]
            row["peak_rss_mb_after_scs"] = _peak_rss_mb()
        row["loadavg"] = os.getloadavg()
        results["nets"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
