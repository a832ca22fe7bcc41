"""Cost of ``sdp._blas.one_thread`` and of a CROWN pass on a small net, before / after.

A/B of two source trees (``--before``, ``--after``), each run as its own process with one
BLAS/OpenMP thread, interleaved (before, after, before, ...) ``--rounds`` times. CPU seconds
(``time.process_time``, user + system: threadpoolctl's library scan is mostly system time
reading ``/proc/self/maps``). Every process imports torch and cvxpy first, as the API and the
RQ workers do, so the loaded-library list is as long as in the service.

- ``one_thread``: per ``with one_thread(): pass``, mean over ``--calls`` calls;
- ``crown``: per :func:`sdp.local.certify_local` call (``method="crown"``, one input, eps 0.05)
  on a random 4-16-16-3 ReLU net, mean over ``--calls`` calls.

Example (what docs/benchmarks.md records)::

    git worktree add /tmp/ot_base main
    PYTHONPATH=. python bench/bench_one_thread.py --before /tmp/ot_base --after .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def worker(calls: int) -> None:
    """Runs inside the tree under test (its sdp on PYTHONPATH); prints one JSON line."""
    import cvxpy  # noqa: F401  (the service's loaded libraries)
    import numpy as np
    import torch  # noqa: F401

    from sdp._blas import one_thread
    from sdp.ir import Activation, Dense, Network
    from sdp.local import certify_local

    with one_thread():  # first scan outside the timings
        pass
    t0 = time.process_time()
    for _ in range(calls):
        with one_thread():
            pass
    per_call = (time.process_time() - t0) / calls

    rng = np.random.default_rng(0)
    sizes = (4, 16, 16, 3)
    ops: list = []
    for i in range(3):
        ops.append(
            Dense(rng.normal(size=(sizes[i + 1], sizes[i])) / 2, rng.normal(size=sizes[i + 1]))
        )
        if i < 2:
            ops.append(Activation("relu", 0.0))
    net = Network((4,), tuple(ops))
    x = rng.normal(size=(1, 4))
    certify_local(net, x, epsilon=0.05, method="crown")
    t0 = time.process_time()
    for _ in range(calls):
        certify_local(net, x, epsilon=0.05, method="crown")
    crown = (time.process_time() - t0) / calls
    print(json.dumps({"one_thread_ms": per_call * 1e3, "crown_ms": crown * 1e3}))


def run(tree: Path, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "--calls", str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", type=Path)
    p.add_argument("--after", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args.calls)
        return
    res: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            r = run(getattr(args, name).resolve(), args.calls)
            res[name].append(r)
            print(name, json.dumps(r), flush=True)
    for name, rows in res.items():
        for key in ("one_thread_ms", "crown_ms"):
            vals = sorted(r[key] for r in rows)
            med = vals[len(vals) // 2]
            print(f"{name} {key}: median {med:.4f} (min {vals[0]:.4f}, max {vals[-1]:.4f})")


if __name__ == "__main__":
    main()
