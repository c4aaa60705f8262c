"""`listing-vision exporter`: the figures no single worker can see, for Prometheus.

One per deployment (workers export their own jobs and stages, `worker/metrics.py`): the depth
of each model's broker queue, messages delivered and not yet acknowledged, each model's queued
and running jobs and the age of its oldest queued one, and every pending or running run's
progress. Read afresh at every scrape; a source that does not answer is reported by
`lv_exporter_source_up` and its figures are left out, never stale. No URL, listing or error
text is ever a label.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from contract.broker import UNACKED_KEY, model_queue, queue_keys
from contract.errors import one_line
from contract.settings import Settings
from db.engine import make_engine, make_sessions
from db.health import ModelBacklog, backlog_by_model
from db.runs import active_runs
from db.schema import Run

log = logging.getLogger(__name__)


class StackCollector(Collector):
    """Collects at every scrape from the broker and the database (models, jobs, runs)."""

    def __init__(self, engine: Engine, broker: redis.Redis) -> None:
        self.engine = engine
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "lv_exporter_source_up",
            "Whether the exporter could read a source at this scrape (1) or not (0)",
            labels=["source"],
        )
        database = self._database()
        up.add_metric(["database"], 0.0 if database is None else 1.0)
        backlog, runs = database if database is not None else ([], [])
        yield from _backlog_metrics(backlog)
        yield from _run_metrics(runs)
        # The models come from the database; without it, the broker is still checked.
        broker = self._broker([model.model_id for model in backlog])
        up.add_metric(["broker"], 0.0 if broker is None else 1.0)
        yield from broker or []
        yield up

    def _database(self) -> tuple[list[ModelBacklog], list[Run]] | None:
        try:
            with make_sessions(self.engine)() as session:
                return backlog_by_model(session), active_runs(session)
        except Exception as error:
            log.warning("exporter: database not read: %s", one_line(error, 200))
            return None

    def _broker(self, models: list[str]) -> list[Metric] | None:
        """Queue depth per model (every priority list of its queue) and unacknowledged
        messages, in one pipeline."""
        try:
            with self.broker.pipeline(transaction=False) as pipe:
                for model in models:
                    for key in queue_keys(model):
                        pipe.llen(key)
                pipe.hlen(UNACKED_KEY)
                lengths = pipe.execute()
        except Exception as error:
            log.warning("exporter: broker not read: %s", one_line(error, 200))
            return None
        depth = GaugeMetricFamily(
            "lv_queue_messages",
            "Messages waiting in a model's broker queue (every priority list)",
            labels=["model", "queue"],
        )
        steps = len(queue_keys("x"))
        for index, model in enumerate(models):
            waiting = sum(int(n) for n in lengths[index * steps : (index + 1) * steps])
            depth.add_metric([model, model_queue(model)], float(waiting))
        unacked = GaugeMetricFamily(
            "lv_broker_unacked_messages",
            "Messages delivered to workers and not yet acknowledged (running, reserved, or "
            "held for a retry's countdown), all queues",
            value=float(lengths[-1]),
        )
        return [depth, unacked]


def _backlog_metrics(backlog: Iterable[ModelBacklog]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "lv_jobs_unfinished",
        "Jobs queued or running, by model and state",
        labels=["model", "state"],
    )
    oldest = GaugeMetricFamily(
        "lv_job_oldest_queued_age_seconds",
        "Age of the oldest queued job of a model (0 when none waits)",
        labels=["model"],
    )
    for model in backlog:
        jobs.add_metric([model.model_id, "queued"], float(model.queued))
        jobs.add_metric([model.model_id, "running"], float(model.running))
        oldest.add_metric([model.model_id], model.oldest_queued_seconds)
    yield jobs
    yield oldest


def _run_metrics(runs: Iterable[Run]) -> Iterator[Metric]:
    labels = ["run", "kind", "model", "status"]
    size = GaugeMetricFamily(
        "lv_run_size_listings", "Listings a pending or running run covers", labels=labels
    )
    done = GaugeMetricFamily("lv_run_done_listings", "Listings a run has analysed", labels=labels)
    failed = GaugeMetricFamily(
        "lv_run_failed_listings", "Listings of a run that ended failed", labels=labels
    )
    ratio = GaugeMetricFamily(
        "lv_run_progress_ratio",
        "Share of a run's listings finished, done or failed (0 to 1)",
        labels=labels,
    )
    for run in runs:
        values = [str(run.run_id), run.kind, run.model_id, run.status]
        size.add_metric(values, float(run.total))
        done.add_metric(values, float(run.done))
        failed.add_metric(values, float(run.failed))
        finished = run.done + run.failed
        ratio.add_metric(values, min(1.0, finished / run.total) if run.total else 0.0)
    yield from (size, done, failed, ratio)


def exporter_registry(resolved: Settings) -> tuple[CollectorRegistry, Engine]:
    """A registry holding the collector, and the engine it reads with (for disposal)."""
    engine = make_engine(
        resolved.require_database_url(), pool_size=1, application_name="listing-vision-exporter"
    )
    broker = redis.Redis.from_url(
        resolved.require_broker_url(),
        socket_timeout=resolved.broker_timeout,
        socket_connect_timeout=resolved.broker_timeout,
    )
    registry = CollectorRegistry()
    registry.register(StackCollector(engine, broker))
    return registry, engine


def run_exporter(resolved: Settings, host: str, port: int, stop: threading.Event) -> None:
    """Serve the metrics on host:port until `stop` is set. A port that cannot be bound
    raises OSError (the caller names it)."""
    registry, engine = exporter_registry(resolved)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
        log.info("exporter on http://%s:%d/metrics", host, port)
        while not stop.wait(1.0):
            pass
        server.shutdown()
        thread.join(5)
    finally:
        engine.dispose()
