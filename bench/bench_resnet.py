"""Benchmark: residual CIFAR nets, verified lipsdp-dag vs the compositional product (issue 13).

Usage (from the repository root; one BLAS thread, as the machine is shared):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD \
        .venv/bin/python bench/bench_resnet.py [--nets resnet_2b ...] [--reverify] [--json OUT]

For each net of ``../shared/fixtures/vnncomp2021/benchmarks/cifar10_resnet/onnx`` (in its own
spawned process, so the peak RSS is that net's): import, then
:func:`sdp.bounds.compute_bound` with ``method="lipsdp-dag"`` (LipSDP-Neuron over the DAG,
design.md §3.6; certified) and its wall time, the compositional product (``naive``), the
empirical lower bound, and with ``--reverify`` a second, independent check of the certificate
(:func:`sdp.bounds.residual.verify_dag_on`, one more full factorisation).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Any

from machine_info import run_line

from sdp.bounds import compute_bound, empirical_lower_bound
from sdp.bounds.residual import verify_dag_on
from sdp.importers import load_model

FIXTURES = (
    Path(os.environ.get("LIPCERT_FIXTURES", "../shared/fixtures"))
    / "vnncomp2021/benchmarks/cifar10_resnet/onnx"
)


def run_one(name: str, reverify: bool) -> dict[str, Any]:
    """Bound one net (runs in a fresh process)."""
    t0 = time.perf_counter()
    net = load_model((FIXTURES / f"{name}.onnx").read_bytes())
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = compute_bound(net, "lipsdp-dag", lower_bound=False)
    t_dag = time.perf_counter() - t1
    assert res.verified and res.certificate is not None
    out: dict[str, Any] = {
        "net": name,
        "hidden": sum(t.size for t in res.certificate.multipliers),
        "load_s": t_load,
        "dag": res.value,
        "dag_s": t_dag,
        "dag_timings": res.timings,
        "closed_form_bound": res.certificate.meta["closed_form_rho"] ** 0.5,
        "peak_rss_mib_after_dag": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    t2 = time.perf_counter()
    out["product"] = compute_bound(net, "naive", lower_bound=False).value
    out["product_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    out["lower"] = empirical_lower_bound(net)
    out["lower_s"] = time.perf_counter() - t3
    if reverify:
        t4 = time.perf_counter()
        out["reverified"] = verify_dag_on(net, res.certificate)
        out["reverify_s"] = time.perf_counter() - t4
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["resnet_2b", "resnet_4b"])
    ap.add_argument("--reverify", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(run_line(), flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    for name in args.nets:
        with ctx.Pool(1) as pool:
            row = pool.apply(run_one, (name, args.reverify))
        row["load_after"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "| net | lipsdp-dag, verified | time | compositional product | empirical lower | peak RSS |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['net']} | {r['dag']:.5g} | {r['dag_s']:.0f} s | {r['product']:.5g} | "
            f"{r['lower']:.3g} | {r['peak_rss_mib']:.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
