#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU machine (the `device` tool).
#
# That machine has python3 with a CUDA torch, numpy, scipy, onnx, pytest and hypothesis, but
# no internet and no ../shared. Here, in the repository root, first
#
#   bash bench/device_check.sh prepare   # copies the networks below into ./.devfix (ignored)
#   bash bench/device_wheels.sh          # optional: FastAPI/pydantic wheels into ./.whl
#
# then run (device tool): command "bash bench/device_check.sh", carry [".devfix", ".whl"],
# timeout_s 540. Steps, each with its own time limit, log and exit status (a failed or
# timed-out step is recorded in $OUT/steps.txt and the next one runs):
#   pytest    the torch-backend, block-algebra, runtime (and worker) tests, CUDA cases only
#   mlp       bench/bench_backends.py on mnistfc-256x2: numpy and the three torch backends
#   deep      torch backends on mnistfc-256x6 and ERAN 9x200 (block S; Z dense or Lanczos)
#   conv      LipSDP-Neuron on the unrolled oval21 cifar_base_kw, block S + Lanczos on DEVICE
#             (1 415 s / 4.5 GB on numpy; solver time limit CONV_TIMEOUT, default 120 s;
#             the host's SVD and certificate check on all cores, the other steps on one)
#   resnet    lipsdp-dag on resnet_2b (numpy on the host: no torch backend, design.md §3.2)
# Logs and JSON land in $OUT (the tool brings them back); copy the tables into
# docs/benchmarks.md with the GPU model and driver printed first. DEVICE=cpu runs the same
# steps with torch on the CPU (a dry run of the script; LIMIT_SCALE=k multiplies the limits).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
V=vnncomp2021/benchmarks # the benches' networks, and those tests/models/test_runtime.py reads
FILES=("$V/mnistfc/mnist-net_256x2.onnx" "$V/mnistfc/mnist-net_256x6.onnx"
    "$V/eran/nets/mnist_relu_9_200.onnx" "$V/oval21/nets/cifar_base_kw.onnx"
    "$V/cifar10_resnet/onnx/resnet_2b.onnx" "$V/eran/nets/ffnnSIGMOID__Point_6x200.onnx"
    lipsdp/random_weights.mat README.md) # README.md: tests/conftest.py looks for it
if [[ "${1:-}" == prepare ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.devfix/' "$exclude" 2>/dev/null || echo '/.devfix/' >>"$exclude"
    for f in "${FILES[@]}"; do
        mkdir -p ".devfix/$(dirname "$f")" && cp "../shared/fixtures/$f" ".devfix/$f"
    done
    exit 0
fi
OUT="${OUT:-/tmp/lipcert-device-check}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export LIPCERT_FIXTURES="${LIPCERT_FIXTURES:-$PWD/.devfix}"
PY="${PYTHON:-python3}"
ONE=(env OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1)

step() { # step NAME LIMIT_S CMD...: log to $OUT/NAME.log, status and seconds to steps.txt
    local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1})) t0=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
    tail -n 12 "$OUT/$name.log"
    echo
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$PY" -c 'import torch, numpy, scipy; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "numpy", numpy.__version__, "scipy", scipy.__version__)'
    nproc
} 2>&1 | tee "$OUT/env.txt"
for f in "${FILES[@]}"; do [[ -f "$LIPCERT_FIXTURES/$f" ]] || echo "missing: $f" | tee -a "$OUT/env.txt"; done

TESTS=(tests/models/test_lipsdp_device.py tests/models/test_lipsdp_blocks.py tests/models/test_runtime.py)
if compgen -G ".whl/*.whl" >/dev/null; then # the service stack, for the worker's CUDA test
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site &&
        TESTS+=(tests/service/test_worker_device.py)
fi
BB=("$PY" bench/bench_backends.py --device "$DEVICE")
KSEL=()
[[ "$DEVICE" == cuda* ]] && KSEL=(-k "not cpu") # the CPU cases run in every session anyway
step pytest 130 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs "${KSEL[@]}" "${TESTS[@]}"
step mlp 50 "${ONE[@]}" "${BB[@]}" --nets mnistfc-256x2 --json "$OUT/mlp.json"
step deep 80 "${ONE[@]}" "${BB[@]}" --backends torch-block torch-block-lz \
    --nets mnistfc-256x6 eran-mnist_relu_9_200 --json "$OUT/deep.json"
step conv 200 "${BB[@]}" --backends torch-block-lz --nets oval21-cifar_base_kw \
    --timeout "${CONV_TIMEOUT:-120}" --json "$OUT/conv.json" # host parts on all cores
step resnet 70 "${ONE[@]}" "$PY" bench/bench_resnet.py --nets resnet_2b --json "$OUT/resnet.json"
cat "$OUT/steps.txt"
