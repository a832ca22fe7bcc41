"""Benchmark: oval21 CIFAR conv nets, verified LipSDP-Neuron-class bounds (auto, eclipse-refined).

Usage (from the repository root; one BLAS thread, as the machine is shared):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD \
        .venv/bin/python bench/bench_conv_lipsdp.py [--nets base wide deep]
        [--methods auto eclipse-refined] [--timeout 120] [--json OUT]

Each (net, method) runs in a fresh subprocess, so its peak RSS is its own (``wait4``):
:func:`sdp.bounds.compute_bound` with the method (auto: its default 120 s limit; eclipse-refined:
``timeout_s``), the empirical lower bound included for auto (part of auto's work) and computed
separately for the others; the certificate re-verified with :func:`sdp.certificate.verify_on`
(not timed); the naive layer product. Nets: ``../shared/fixtures/vnncomp2021/benchmarks/oval21/
nets/cifar_{base,wide,deep}_kw.onnx``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine_info import git_commit, run_line

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
OVAL = FIXTURES / "vnncomp2021" / "benchmarks" / "oval21" / "nets"


def run_one(net_name: str, method: str, timeout: float) -> dict[str, Any]:
    """One measurement, in this process (the child side)."""
    from sdp.bounds import compute_bound, empirical_lower_bound
    from sdp.certificate import verify_on
    from sdp.importers import load_model_file

    net = load_model_file(OVAL / f"cifar_{net_name}_kw.onnx")
    naive = compute_bound(net, "naive", lower_bound=False).value
    t0 = time.perf_counter()
    if method == "auto":
        res = compute_bound(net, "auto")
    else:
        res = compute_bound(net, method, timeout_s=timeout, lower_bound=False)
    wall = time.perf_counter() - t0
    low = res.lower_bound if res.lower_bound is not None else empirical_lower_bound(net)
    rechecked = res.certificate is not None and verify_on(net, res.certificate)
    return {
        "net": f"cifar_{net_name}_kw",
        "requested": method,
        "method": res.method,
        "bound": res.value,
        "seconds": wall,
        "timings": res.timings,
        "naive": naive,
        "lower_bound": low,
        "rechecked": rechecked,
        "hidden": sum(net.chain().hidden_sizes),
        "notes": list(res.notes),
    }


def measure(net_name: str, method: str, timeout: float) -> dict[str, Any]:
    """Run :func:`run_one` in a child process; add its peak RSS (MiB)."""
    cmd = [sys.executable, __file__, "--child", net_name, method, str(timeout)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        _, status, usage = os.wait4(proc.pid, 0)
        out = proc.stdout.read() if proc.stdout else ""
    if status != 0:
        raise RuntimeError(f"{net_name}/{method} failed with status {status}")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mib"] = usage.ru_maxrss / 1024
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_one(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["base", "wide", "deep"])
    ap.add_argument("--methods", nargs="+", default=["auto", "eclipse-refined"])
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    commit = git_commit()
    print(run_line(), flush=True)
    rows = []
    for name in args.nets:
        for method in args.methods:
            row = measure(name, method, args.timeout)
            rows.append(row)
            print(
                f"{row['net']:>15} {method:>15}: {row['method']} {row['bound']:.6g} "
                f"(rechecked {row['rechecked']}) in {row['seconds']:.1f} s, peak RSS "
                f"{row['peak_rss_mib']:.0f} MiB | product {row['naive']:.6g} "
                f"({row['naive'] / row['bound']:.2f}x) | lower {row['lower_bound']:.4g} | "
                f"load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
