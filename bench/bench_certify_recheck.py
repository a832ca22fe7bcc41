"""Cost of the API's re-check of RQ certification chunks (service.jobs.certify_check).

Certifies the first ``--n`` MNIST test images on mnistfc-256x2 as a worker does
(``certify_chunk(..., certificates=True)``, largest-radius search by ``--method`` with the
naive bound as floor, chunks of ``--chunk``), then re-checks them as the API does
(``split_chunks`` + ``recheck_batch`` on the npz bundle). Prints both times, the share of
the re-check, the bundle size per input, and how many certificates were refused (0)::

    PYTHONPATH=. python bench/bench_certify_recheck.py --n 32 --method crown
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from mnist_data import mnist_test

from sdp.bounds import naive_bound
from sdp.importers.limits import Limits
from sdp.importers.onnx import load_onnx
from service.jobs.certify import CertifyOptions, certify_chunk, npz
from service.jobs.certify_check import recheck_batch
from service.jobs.certify_rq import split_chunks

FIX = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
MODEL = FIX / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--method", default="crown")
    ap.add_argument("--time-budget", type=float, default=2.0)
    args = ap.parse_args()
    net = load_onnx(MODEL.read_bytes(), Limits())
    x = mnist_test(args.n)[0]
    opts = CertifyOptions.new(
        rows=args.n,
        chunk_rows=args.chunk,
        workers=1,
        method=args.method,
        time_budget_s=args.time_budget,
        lipschitz=float(naive_bound(net)[0]),
    )
    inputs = {"x": np.asarray(x, dtype=np.float64)}
    t0 = time.perf_counter()
    parts = [certify_chunk(net, inputs, opts, a, b, certificates=True) for a, b in opts.chunks()]
    certify_s = time.perf_counter() - t0
    bundle = npz({f"c{k}/{n}": a for k, p in enumerate(parts) for n, a in p.items()})
    t0 = time.perf_counter()
    checked, refused = recheck_batch(net, inputs, opts, split_chunks(bundle, len(parts)))
    recheck_s = time.perf_counter() - t0
    same = all(
        c["radius"].tolist() == p["radius"].tolist() for c, p in zip(checked, parts, strict=True)
    )
    methods = sorted({m for p in parts for m in p["radius_method"].tolist()})
    print(
        f"method={args.method} n={args.n} chunk={args.chunk} certify_s={certify_s:.3f} "
        f"recheck_s={recheck_s:.3f} ratio={recheck_s / certify_s:.3f} "
        f"recheck_ms_per_input={1000 * recheck_s / args.n:.2f} "
        f"bundle_kb_per_input={len(bundle) / 1024 / args.n:.1f} refused={refused} "
        f"same_radii={same} methods={methods}"
    )


if __name__ == "__main__":
    main()
