#!/usr/bin/env bash
# The GPU checks in one run, for a session that is lent a GPU machine (the `device` tool).
#
# That machine has python3 with a CUDA torch, numpy, scipy, onnx, pytest and hypothesis, but
# no internet and no ../shared: copy the networks the benchmark needs into an ignored folder
# and carry it. Here, in the repository root:
#
#   echo /.devfix/ >> .git/info/exclude
#   d=.devfix/vnncomp2021/benchmarks; mkdir -p $d/mnistfc $d/eran/nets
#   cp ../shared/fixtures/vnncomp2021/benchmarks/mnistfc/mnist-net_256x{2,6}.onnx $d/mnistfc/
#   cp ../shared/fixtures/vnncomp2021/benchmarks/eran/nets/mnist_relu_9_200.onnx $d/eran/nets/
#
# and `bash bench/device_wheels.sh` (FastAPI/pydantic wheels for python 3.12 into ./.whl), then
# run (device tool): command "bash bench/device_check.sh", carry [".devfix", ".whl"],
# timeout_s 540. It runs (1) the torch-backend, runtime and inference-worker tests, whose CUDA
# cases are skipped on machines without a GPU, and (2) the structured LipSDP solver on cuda and
# on the CPU (numpy backend, 1 thread) for the three issue-7 nets. Logs and JSON land in $OUT
# (the tool brings them back); copy the numbers into docs/benchmarks.md with the GPU model and
# driver printed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lipcert-device-check}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
read -ra NETS <<<"${NETS:-mnistfc-256x2 mnistfc-256x6 eran-mnist_relu_9_200}"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$PY" -c 'import torch, numpy, scipy; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "numpy", numpy.__version__, "scipy", scipy.__version__)'
} 2>&1 | tee "$OUT/env.txt"

TESTS=(tests/models/test_lipsdp_device.py tests/models/test_runtime.py)
if compgen -G ".whl/*.whl" >/dev/null; then  # the service stack, for the worker's CUDA test
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=.:/tmp/site &&
        TESTS+=(tests/service/test_worker_device.py)
fi
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}" -rs 2>&1 |
    tee "$OUT/pytest.log"

export LIPCERT_FIXTURES="${LIPCERT_FIXTURES:-$PWD/.devfix}"  # the benchmark's networks
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$PY" bench/bench_fast_lipsdp.py --no-scs --device "${DEVICE:-cuda}" --nets "${NETS[@]}" \
    --json "$OUT/fast_lipsdp_gpu.json" 2>&1 | tee "$OUT/fast_lipsdp_gpu.log"
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$PY" bench/bench_fast_lipsdp.py --no-scs --device cpu --nets "${NETS[0]}" \
    --json "$OUT/fast_lipsdp_cpu.json" 2>&1 | tee "$OUT/fast_lipsdp_cpu.log"
