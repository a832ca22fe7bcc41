#!/usr/bin/env bash
# Download, HERE, the wheels the GPU machine lacks for the service-level device tests
# (tests/service/test_worker_device.py): its python3 (3.12) has torch, numpy, scipy, onnx,
# pytest, httpx, prometheus-client and typer but not FastAPI, pydantic, orjson or the
# opentelemetry-api that FastAPI imports. They land in ./.whl
# (ignored); bench/device_check.sh installs them there when the run carries ".whl".
#
#   bash bench/device_wheels.sh      # then run(..., carry=[".devfix", ".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
VPY=.venv/bin/python
# the versions this checkout's venv runs, so the GPU machine tests the same stack
pins=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -i -E \
    '^(fastapi|starlette|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|annotated[-_]doc|annotated[-_]types|typing[-_]inspection|orjson|python[-_]multipart|opentelemetry[-_]api)==')
rm -rf .whl && mkdir -p .whl
plats=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    plats+=(--platform "$p")
done
# shellcheck disable=SC2086
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plats[@]}" --platform any -d .whl $pins
ls .whl
