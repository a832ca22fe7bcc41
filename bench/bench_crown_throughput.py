"""CROWN throughput on 10 000 inputs and sigmoid slopes, before / after (issue 12).

Two parts, each an A/B comparison of two source trees (``--before``: e.g. a temporary
worktree of the base commit, ``--after``: this tree), run as separate processes with the
given BLAS / OpenMP thread counts and interleaved (before, after, before, after, ...) so that
the machine's load hits both alike:

- throughput: :func:`sdp.local.certify_local` with ``method="crown"`` at one eps on the first
  ``--n`` MNIST test images (pixels / 255) on mnistfc-256x2: seconds, inputs per second and
  certified accuracy, for every ``--threads`` value;
- sigmoid (``--sigmoid``): certified accuracy of crown and alpha-crown at eps 0.1 / 0.2 / 0.3
  on the first ``--sigmoid-n`` correctly classified test images on ERAN ffnnSIGMOID 6x200.

Example (what docs/benchmarks.md records)::

    git worktree add /tmp/cf_base ca10424
    PYTHONPATH=. python bench/bench_crown_throughput.py --before /tmp/cf_base --after . \\
        --threads 1,2 --sigmoid
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
NET_SIG = FIX / "vnncomp2021" / "benchmarks" / "eran" / "nets" / "ffnnSIGMOID__Point_6x200.onnx"


def worker(args: argparse.Namespace) -> None:
    """Runs inside the tree under test (its sdp on PYTHONPATH); prints one JSON line."""
    from sdp.importers import load_model_file
    from sdp.local import certify_local

    if args.worker == "throughput":
        net = load_model_file(NET_256X2)
        x, y = mnist_test(args.n)
        t0 = time.perf_counter()
        res = certify_local(net, x, labels=y, epsilon=args.eps, method="crown")
        dt = time.perf_counter() - t0
        assert res.certified is not None and res.correct is not None
        out = {
            "seconds": dt,
            "per_s": args.n / dt,
            "certified": float(np.mean(res.certified & res.correct)),
        }
    else:
        net = load_model_file(NET_SIG)
        x, y = mnist_test(10 * args.sigmoid_n)
        ok = np.argmax(net.forward(x), axis=1) == y
        x, y = x[ok][: args.sigmoid_n], y[ok][: args.sigmoid_n]
        out = {}
        for method in ("crown", "alpha-crown"):
            for eps in (0.1, 0.2, 0.3):
                t0 = time.perf_counter()
                res = certify_local(net, x, labels=y, epsilon=eps, method=method)
                assert res.certified is not None
                out[f"{method}@{eps}"] = {
                    "certified": float(np.mean(res.certified)),
                    "s_per_input": (time.perf_counter() - t0) / len(x),
                }
    print(json.dumps(out), flush=True)


def launch(tree: str, threads: int, extra: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(tree).resolve())
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default=None, help="source tree of the baseline")
    p.add_argument("--after", default=str(ROOT))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument(
        "--before-n", type=int, default=None, help="inputs for the baseline (default --n)"
    )
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sigmoid", action="store_true")
    p.add_argument("--sigmoid-n", type=int, default=100)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--worker", choices=("throughput", "sigmoid"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    trees = [("before", args.before)] if args.before else []
    trees.append(("after", args.after))
    print(f"load (uptime): {os.getloadavg()}", flush=True)
    if not args.skip_throughput:
        print(f"\n256x2 crown, {args.n} MNIST test inputs, eps {args.eps}")
        print("| tree | inputs | threads | seconds | inputs/s | certified accuracy |")
        print("|---|---|---|---|---|---|")
        for _ in range(args.repeats):
            for t in (int(v) for v in args.threads.split(",")):
                for name, tree in trees:
                    n = args.before_n if name == "before" and args.before_n else args.n
                    r = launch(
                        tree,
                        t,
                        ["--worker", "throughput", "--n", str(n), "--eps", str(args.eps)],
                    )
                    print(
                        f"| {name} | {n} | {t} | {r['seconds']:.1f} | {r['per_s']:.0f} | "
                        f"{100 * r['certified']:.2f}% |",
                        flush=True,
                    )
    if args.sigmoid:
        print(f"\nffnnSIGMOID 6x200, first {args.sigmoid_n} correctly classified, 1 thread")
        print("| tree | method | eps 0.1 | eps 0.2 | eps 0.3 | s/input (0.1/0.2/0.3) |")
        print("|---|---|---|---|---|---|")
        for name, tree in trees:
            r = launch(tree, 1, ["--worker", "sigmoid", "--sigmoid-n", str(args.sigmoid_n)])
            for m in ("crown", "alpha-crown"):
                cells = [f"{100 * r[f'{m}@{e}']['certified']:.0f}%" for e in (0.1, 0.2, 0.3)]
                secs = "/".join(f"{r[f'{m}@{e}']['s_per_input']:.2f}" for e in (0.1, 0.2, 0.3))
                print(f"| {name} | {m} | {' | '.join(cells)} | {secs} |", flush=True)
    print(f"load (uptime) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
