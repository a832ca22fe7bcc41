"""Wall time of one certification job on RQ with 1 and with N ``lipcert worker`` processes.

A real redis-server and real workers; the API runs in this process (TestClient). The job
certifies the first ``--n`` MNIST test images on mnistfc-256x2 (largest-radius search by
``--method``) in chunks of ``--chunk`` inputs; every worker that takes part certifies chunks
(the job's own horse and the helper jobs). Prints the seconds per run and the speed-up::

    PYTHONPATH=. python bench/bench_local_jobs.py --workers 1,2 --n 32 --chunk 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from mnist_data import mnist_test
from redis import Redis
from rq import Worker

from service.app import create_app
from service.settings import Settings

FIX = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
MODEL = FIX / "vnncomp2021" / "benchmarks" / "mnistfc" / "mnist-net_256x2.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = shutil.which("redis-server") or "redis-server"
    args = [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            if Redis.from_url(url).ping():
                return proc, url
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_workers(url: str, count: int, tag: str) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, LIPCERT_QUEUE_URL=url, LIPCERT_DEVICE="cpu")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("lipcert")
    names = [f"{tag}-{i}" for i in range(count)]
    procs = [
        subprocess.Popen(
            [str(exe), "worker", "--name", n],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for n in names
    ]
    conn = Redis.from_url(url)
    while not set(names) <= {w.name for w in Worker.all(connection=conn)}:
        time.sleep(0.2)
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--method", default="crown")
    ap.add_argument("--time-budget", type=float, default=2.0)
    args = ap.parse_args()
    x = mnist_test(args.n)[0]
    times: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis, url = start_redis(Path(tmp))
        try:
            for count in [int(v) for v in args.workers.split(",")]:
                data = Path(tmp) / f"api-{count}"
                settings = Settings(data_dir=data, queue_url=url, device="cpu")
                workers = start_workers(url, count, f"bench{count}")
                try:
                    with TestClient(create_app(settings)) as c:
                        mid = c.post("/v1/models", files={"file": ("m.onnx", MODEL.read_bytes())})
                        body = {
                            "inputs": x.tolist(),
                            "method": args.method,
                            "time_budget_s": args.time_budget,
                            "chunk_rows": args.chunk,
                            "workers": count,
                        }
                        t0 = time.perf_counter()
                        job = c.post(f"/v1/models/{mid.json()['id']}/certifications", json=body)
                        job_id = job.json()["id"]
                        while True:
                            rec = c.get(f"/v1/jobs/{job_id}").json()
                            if rec["status"] in ("succeeded", "failed", "cancelled"):
                                break
                            time.sleep(0.1)
                        times[count] = time.perf_counter() - t0
                        res = rec["result"] or rec["error"]
                        print(
                            f"{count} worker(s): {times[count]:.1f} s wall, status "
                            f"{rec['status']}, chunks by worker {res.get('chunks_by_worker')}, "
                            f"certification time {res.get('seconds', 0):.1f} s",
                            flush=True,
                        )
                finally:
                    stop(workers)
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    base = min(times)
    for count, t in sorted(times.items()):
        print(f"speed-up with {count} worker(s): {times[base] / t:.2f}x")


if __name__ == "__main__":
    main()
