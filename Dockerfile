# lipcert: the HTTP API (and, with another command, the Redis solver worker).
#
#   docker build -t lipcert .                                   # CPU torch wheel (default)
#   docker build -t lipcert:cuda --build-arg TORCH_FLAVOUR=cu128 .   # CUDA torch wheel
#   docker run -p 8000:8000 -v lipcert-data:/data lipcert
#
# TORCH_FLAVOUR names a wheel index under https://download.pytorch.org/whl/ ("cpu", "cu126",
# "cu128", ... whichever carries torch ${TORCH_VERSION}). CUDA wheels bundle the CUDA runtime,
# so the same slim base works on GPU hosts (run with --gpus all).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_FLAVOUR=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the chosen flavour's index, so lipcert's own install never swaps it.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_FLAVOUR}" \
        "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdp ./sdp
COPY models ./models
COPY service ./service
RUN pip install --no-cache-dir . \
    && python -c "import sdp, models, service.app, service.healthcheck"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LIPCERT_DATA_DIR=/data
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/lipcert lipcert \
    && mkdir -p /data && chown 10001:10001 /data
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["lipcert", "serve", "--host", "0.0.0.0", "--port", "8000"]
