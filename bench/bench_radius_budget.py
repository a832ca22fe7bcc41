"""Does the radius search keep to its budget? Wall and CPU seconds per input, before / after.

:func:`sdp.local.certify_local` with ``epsilon=None`` (the largest-radius search) on the first
``--n`` MNIST test images (pixels / 255) on mnistfc-256x2, ``time_budget_s=--budget``, for
each ``--methods``; the source trees ``--before`` and ``--after`` run as separate processes,
interleaved (before, after, before, after, ...) so that the machine's load hits both alike.
``--cpu-clock`` measures beta-crown's own budgets in CPU seconds (as bench_local.py does).
A budget kept means wall seconds per input <= the budget (CPU seconds with ``--cpu-clock``).

Example (what docs/benchmarks.md records)::

    git worktree add --detach /tmp/rb_base main
    PYTHONPATH=. python bench/bench_radius_budget.py --before /tmp/rb_base --after . \\
        --n 8 --budget 1 --methods beta-crown,auto --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mnist_data import mnist_test

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT.parent / "shared" / "fixtures"
NET_256X2 = FIX / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"


def child(args: argparse.Namespace) -> None:
    """One measurement in this process (the tree on PYTHONPATH); prints one JSON line."""
    from sdp.importers import load_model_file
    from sdp.local import certify_local

    if args.cpu_clock:
        try:  # one clock for every budget (sdp.local.clock); older trees: beta-crown's own
            from sdp.local import clock

            clock.CLOCK = time.process_time
        except ImportError:
            from sdp.local import beta_crown

            beta_crown.CLOCK = time.process_time  # type: ignore[attr-defined]
    net = load_model_file(NET_256X2)
    x = mnist_test(args.n)[0]
    certify_local(net, x[:1], epsilon=0.01, method="crown")  # imports, caches: untimed
    t, c = time.perf_counter(), time.process_time()
    res = certify_local(net, x, method=args.method, time_budget_s=args.budget, global_bound=312.416)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    out = {"wall_per_input": wall / args.n, "cpu_per_input": cpu / args.n}
    print(json.dumps({**out, "median_radius": float(np.median(res.radius))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, default=ROOT)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--methods", default="beta-crown,auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpu-clock", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    threads = {v: "1" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    print(f"budget {args.budget} s per input, {args.n} inputs, cpu clock {args.cpu_clock}")
    for method in args.methods.split(","):
        for r in range(args.rounds):
            for name, tree in (("before", args.before), ("after", args.after)):
                env = {**os.environ, **threads, "PYTHONPATH": str(Path(tree).resolve())}
                cmd = [sys.executable, __file__, "--child", "--before", str(args.before)]
                cmd += ["--n", str(args.n), "--budget", str(args.budget), "--method", method]
                cmd += ["--cpu-clock"] if args.cpu_clock else []
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{method:10s} round {r} {name:6s} wall {row['wall_per_input']:.4f} s/input "
                    f"cpu {row['cpu_per_input']:.4f} s/input "
                    f"median radius {row['median_radius']:.4g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
