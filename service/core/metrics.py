"""All Prometheus metrics of the service, in a registry of their own (one per app, so that
several apps in one process, as in tests, do not collide). Names end in their unit; every series
carries the model it is about ("" where a request named no known model).

With `--workers N` (N >= 2) the engine process and every front-end worker write their samples
into files of one directory (prometheus_client's multiprocess mode, `enable_multiprocess`), and
/metrics, answered by whichever worker, adds them up: one view of the whole service. Counters and
histograms are summed over processes (a worker that was replaced keeps its counts); gauges say
how they combine (`multiprocess_mode`: in-flight figures are summed over live processes, the
readiness and last-poll gauges are the live maximum).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: Path) -> None:
    """From now on, in this process and the processes it starts, samples go to files in
    `directory` (before any Metrics is made). prometheus_client decides this from the variable
    when it is first imported; the engine process has imported it by then, so its choice is
    made again here the same way."""
    os.environ[MULTIPROC_VARIABLE] = str(directory)
    values.ValueClass = values.get_value_class()


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROC_VARIABLE)


def forget_process(pid: int) -> None:
    """Drop the live gauges of a process that has exited (its counters stay counted)."""
    directory = multiprocess_directory()
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "resnet_serve_requests_total",
            "Inference requests answered, by endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "resnet_serve_request_duration_seconds",
            "Time from receiving an inference request to its answer.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "resnet_serve_images_total",
            "Images sent to inference (decoded, or given as preprocessed tensors).",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "resnet_serve_requests_in_flight",
            "Inference requests being processed.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.preprocess_latency = Histogram(
            "resnet_serve_preprocess_duration_seconds",
            "Decoding and preprocessing time per image, in a worker thread.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "resnet_serve_queue_wait_seconds",
            "Time an image waited in the batcher's queue before its batch ran.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "resnet_serve_queue_depth_images",
            "Images waiting for their batch to run (being decoded, queued, or in a forming batch).",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "resnet_serve_batch_size_images",
            "Images per inference batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "resnet_serve_inference_duration_seconds",
            "Time per batch from its start to its rows delivered: stacking the inputs, the "
            "engine's run (onnxruntime or OpenVINO) and copying the outputs back.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "resnet_serve_ready",
            "1 when every model is loaded and warmed.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.inflight_bytes = Gauge(
            "resnet_serve_inflight_request_bytes",
            "Bytes of request bodies held in memory now (bounded by max_inflight_bytes per "
            "front-end process).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.poll_errors = Counter(
            "resnet_serve_repository_poll_errors_total",
            "Repository scans of model_control_mode=poll that failed (polling goes on).",
            registry=r,
        )
        self.poll_last_success = Gauge(
            "resnet_serve_repository_poll_last_success_timestamp_seconds",
            "When a repository scan of model_control_mode=poll last worked (Unix time).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.unauthorized = Counter(
            "resnet_serve_unauthorized_total",
            "Requests refused for a missing or wrong bearer token (before any decoding).",
            ["protocol", "reason"],
            registry=r,
        )

    def render(self) -> bytes:
        directory = multiprocess_directory()
        if directory is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=directory)
        return generate_latest(combined)
