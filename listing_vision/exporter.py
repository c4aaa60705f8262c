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


_RUN = ("run", "kind", "model", "status")
# Every metric the exporter serves: name -> (help, labels). `collect` fills them; `describe`
# hands them to prometheus_client (and to the tests that check the dashboard's names).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lv_queue_messages": (
        "Messages waiting in a model's broker queue (every priority list)",
        ("model", "queue"),
    ),
    "lv_broker_unacked_messages": (
        "Messages delivered to workers and not yet acknowledged (running, reserved, or held "
        "for a retry's countdown), all queues",
        (),
    ),
    "lv_jobs_unfinished": ("Jobs queued or running, by model and state", ("model", "state")),
    "lv_job_oldest_queued_age_seconds": (
        "Age of the oldest queued job of a model (0 when none waits)",
        ("model",),
    ),
    "lv_run_size_listings": ("Listings a pending or running run covers", _RUN),
    "lv_run_done_listings": ("Listings a run has analysed", _RUN),
    "lv_run_failed_listings": ("Listings of a run that ended failed", _RUN),
    "lv_run_progress_ratio": ("Share of a run's listings finished, done or failed (0 to 1)", _RUN),
    "lv_exporter_source_up": (
        "Whether the exporter could read a source at this scrape (1) or not (0)",
        ("source",),
    ),
}


def _family(name: str) -> GaugeMetricFamily:
    help_text, labels = METRICS[name]
    return GaugeMetricFamily(name, help_text, labels=list(labels))


class StackCollector(Collector):
    """Collects at every scrape from the broker and the database (models, jobs, runs)."""

    def __init__(self, engine: Engine, broker: redis.Redis) -> None:
        self.engine = engine
        self.broker = broker

    def describe(self) -> Iterator[Metric]:
        """The metrics without reading anything (prometheus_client calls this on register)."""
        return (_family(name) for name in METRICS)

    def collect(self) -> Iterator[Metric]:
        families = {name: _family(name) for name in METRICS}
        up = families["lv_exporter_source_up"]
        database = self._database()
        up.add_metric(["database"], 0.0 if database is None else 1.0)
        backlog, runs = database if database is not None else ([], [])
        _add_backlog(families, backlog)
        _add_runs(families, runs)
        # The models come from the database; without it, the broker is still checked.
        broker = self._broker(families, [model.model_id for model in backlog])
        up.add_metric(["broker"], 1.0 if broker else 0.0)
        for name, family in families.items():
            if broker or name not in _FROM_BROKER:  # a source not read: left out, not zero
                yield family

    def _database(self) -> tuple[list[ModelBacklog], list[Run]] | None:
        try:
            with make_sessions(self.engine)() as session:
                return backlog_by_model(session), active_runs(session)
        except Exception as error:
            log.warning("exporter: database not read: %s", one_line(error, 200))
            return None

    def _broker(self, families: dict[str, GaugeMetricFamily], models: list[str]) -> bool:
        """Queue depth per model (every priority list of its queue) and unacknowledged
        messages, in one pipeline; False if the broker could not be read."""
        steps = len(queue_keys("x"))
        try:
            with self.broker.pipeline(transaction=False) as pipe:
                for model in models:
                    for key in queue_keys(model):
                        pipe.llen(key)
                pipe.hlen(UNACKED_KEY)
                lengths = pipe.execute()
        except Exception as error:
            log.warning("exporter: broker not read: %s", one_line(error, 200))
            return False
        for index, model in enumerate(models):
            waiting = sum(int(n) for n in lengths[index * steps : (index + 1) * steps])
            families["lv_queue_messages"].add_metric([model, model_queue(model)], float(waiting))
        families["lv_broker_unacked_messages"].add_metric([], float(lengths[-1]))
        return True


_FROM_BROKER = ("lv_queue_messages", "lv_broker_unacked_messages")


def _add_backlog(families: dict[str, GaugeMetricFamily], backlog: Iterable[ModelBacklog]) -> None:
    for model in backlog:
        families["lv_jobs_unfinished"].add_metric([model.model_id, "queued"], model.queued)
        families["lv_jobs_unfinished"].add_metric([model.model_id, "running"], model.running)
        families["lv_job_oldest_queued_age_seconds"].add_metric(
            [model.model_id], model.oldest_queued_seconds
        )


def _add_runs(families: dict[str, GaugeMetricFamily], runs: Iterable[Run]) -> None:
    for run in runs:
        labels = [str(run.run_id), run.kind, run.model_id, run.status]
        finished = run.done + run.failed
        families["lv_run_size_listings"].add_metric(labels, float(run.total))
        families["lv_run_done_listings"].add_metric(labels, float(run.done))
        families["lv_run_failed_listings"].add_metric(labels, float(run.failed))
        ratio = min(1.0, finished / run.total) if run.total else 0.0
        families["lv_run_progress_ratio"].add_metric(labels, ratio)


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
