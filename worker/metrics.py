"""Prometheus metrics of one worker (`LV_METRICS_PORT`), names `lv_…` with their units.

Per worker: jobs by outcome, time per job stage (`queue_wait` from a job's creation to its
first claim, then claim, fetch, decode, infer, write), items per model call per tower, images
and texts embedded (their `rate()` is the throughput), model load time, and GPU memory where
there is a GPU. Only counts and times are exported: no URL, listing or error text is ever a
label. Queue depth and run progress come from the one exporter (`listing_vision/exporter.py`)."""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)
# Up to an hour: a queue wait during a backlog is minutes, where a fetch is milliseconds.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (*_FAST, 60, 300, 900, 3600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    """One registry per worker process; `serve` exposes it over HTTP."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.registry = CollectorRegistry()
        labels = ("model",)
        self.jobs = Counter(
            "lv_jobs", "Jobs finished, by outcome", ("model", "outcome"), registry=self.registry
        )
        self.stage_seconds = Histogram(
            "lv_job_stage_seconds",
            "Time one job spent in a stage",
            ("model", "stage"),
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.call_items = Histogram(
            "lv_model_call_items",
            "Items per model call (the batch size), by tower",
            ("model", "tower"),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.embedded = Counter(
            "lv_embedded_items",
            "Images or texts embedded, by tower",
            ("model", "tower"),
            registry=self.registry,
        )
        self.load_seconds = Gauge(
            "lv_model_load_seconds",
            "Seconds the model took to load",
            labels,
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "lv_gpu_memory_allocated_bytes",
            "CUDA memory allocated by this worker",
            labels,
            registry=self.registry,
        )
        if torch.cuda.is_available():
            self.gpu_memory.labels(model_id).set_function(
                lambda: float(torch.cuda.memory_allocated())
            )

    def job(self, outcome: str, stages: dict[str, float]) -> None:
        """A finished job: its outcome and the seconds of each stage it went through."""
        self.jobs.labels(self.model_id, outcome).inc()
        for stage, seconds in stages.items():
            self.stage_seconds.labels(self.model_id, stage).observe(seconds)

    def model_call(self, tower: str, items: int) -> None:
        self.call_items.labels(self.model_id, tower).observe(items)
        self.embedded.labels(self.model_id, tower).inc(items)

    def serve(self, port: int, host: str = "0.0.0.0") -> bool:
        """Expose the metrics on `host:port` (`LV_METRICS_HOST`: every interface by default,
        where Prometheus scrapes from elsewhere); a port already taken is logged, and the worker
        runs on without metrics."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            log.warning("metrics not served: %s port %d: %s", host, port, error)
            return False
        log.info("metrics on %s:%d/metrics", host, port)
        return True
