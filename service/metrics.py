"""Prometheus metrics of the service (one registry per process, scraped at ``/metrics``).

Request counts and latency are labelled by route *template* (``/v1/models/{model_id}``), never
by raw path, so label cardinality stays bounded. Job runners may observe
:data:`SOLVE_SECONDS` and set :data:`JOBS` themselves; the ``/metrics`` route also refreshes
:data:`JOBS` from ``runner.status_counts()`` when the runner offers it.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "lipcert_http_requests",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "lipcert_http_request_duration_seconds",
    "HTTP request latency by route template.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "lipcert_inference_batch_size",
    "Rows per forward pass of the inference worker (micro-batches).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
    registry=REGISTRY,
)
BATCH_REQUESTS = Histogram(
    "lipcert_inference_batch_requests",
    "Requests merged into one forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "lipcert_inference_forward_seconds",
    "Duration of one batched forward pass on the device.",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "lipcert_inference_queue_depth",
    "Inference requests waiting for the worker.",
    registry=REGISTRY,
)
JOBS = Gauge("lipcert_jobs", "Bound jobs by status.", ["status"], registry=REGISTRY)
SOLVE_SECONDS = Histogram(
    "lipcert_bound_solve_seconds",
    "Wall time of bound computations by method.",
    ["method"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
