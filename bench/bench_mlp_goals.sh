#!/usr/bin/env bash
# Issue 13's MLP goals (mnistfc-256x2 <= 2 s, 256x6 <= 15 s, ERAN 9x200 <= 20 s), interleaved:
# ROUNDS rounds, each net once with the default BLAS threads (all cores, one process) and once
# with one thread. Prints one JSON line per solve (bench_fast_lipsdp.py's). Run it on a quiet
# machine: `bash bench/bench_mlp_goals.sh 4 > /tmp/mlp_goals.jsonl`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
PY=${PYTHON:-.venv/bin/python}
NETS=(mnistfc-256x2 mnistfc-256x6 eran-mnist_relu_9_200)
for round in $(seq "$ROUNDS"); do
  for net in "${NETS[@]}"; do
    for threads in default 1; do
      if [[ $threads == default ]]; then
        env -u OMP_NUM_THREADS -u MKL_NUM_THREADS -u OPENBLAS_NUM_THREADS PYTHONPATH="$PWD" \
          "$PY" bench/bench_fast_lipsdp.py --nets "$net" --no-scs | tail -1 | sed "s/^/round=$round threads=$threads /"
      else
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH="$PWD" \
          "$PY" bench/bench_fast_lipsdp.py --nets "$net" --no-scs | tail -1 | sed "s/^/round=$round threads=$threads /"
      fi
    done
  done
done
