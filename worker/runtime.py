"""Everything one worker process keeps warm: the model, its batcher, categories, connections,
and the background threads that watch over them (stall watchdog, reconciler)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import one_line
from contract.registry import ModelSpec, Registry, configured_spec
from contract.settings import Settings
from contract.thresholds import ThresholdSource
from db import embedding_index, registered_models, runs
from db.engine import make_engine, make_sessions
from db.milvus import open_store
from worker.analysis import ListingAnalyzer
from worker.backends import create_backend
from worker.backends.base import ModelBackend
from worker.categories import CategoryIndex, read_categories
from worker.chunk_analysis import ChunkAnalyzer
from worker.chunk_runner import ChunkRunner
from worker.fetch import FetchPolicy
from worker.inference import InferenceService
from worker.job_groups import JobGroups, ResendJobs
from worker.job_runner import JobRunner
from worker.metrics import WorkerMetrics
from worker.mirror import NO_MIRROR, MirrorHook, MirrorWriter
from worker.outcomes import OutcomeWriter
from worker.reconciler import Lateness, Reconciler, SendChunks, SendJobs
from worker.scorer import ListingScorer
from worker.shared_queries import SharedQueries
from worker.thresholds import RecordedThresholds
from worker.watchdog import start_stall_watchdog

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """The warm state of one worker process; `close` stops its threads."""

    spec: ModelSpec
    backend: ModelBackend
    service: InferenceService
    runner: JobRunner
    groups: JobGroups
    chunks: ChunkRunner
    executor: ThreadPoolExecutor
    stops: list[threading.Event] = field(default_factory=list)
    mirror: MirrorHook = NO_MIRROR

    def close(self) -> None:
        for stop in self.stops:
            stop.set()
        self.groups.close()
        self.service.close()
        self.runner.queries.close()
        self.runner.writer.close()
        self.mirror.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Senders:
    """How the worker publishes work again: jobs, single jobs with a delay (what a group
    hands on), and run chunks (with a delay)."""

    jobs: SendJobs
    chunks: SendChunks
    resend: ResendJobs


def batch_limits(settings: Settings, spec: ModelSpec) -> tuple[int, float]:
    """The registry entry's batch size and wait, else the `LV_BATCH_*` defaults."""
    size = spec.batch_max_size or settings.batch_max_size
    wait_ms = spec.batch_max_wait_ms
    return size, (settings.batch_max_wait_ms if wait_ms is None else wait_ms) / 1000.0


def worker_concurrency(settings: Settings, spec: ModelSpec) -> int:
    """Enough task threads to fill one batch while the previous one runs."""
    return settings.worker_concurrency or 2 * batch_limits(settings, spec)[0]


def lateness(settings: Settings) -> Lateness:
    """When work counts as lost: unsent for a minute; running (or a run not progressing) far
    past the broker's own redelivery of a dead worker's messages (the visibility timeout)."""
    stuck = timedelta(seconds=2 * settings.visibility_timeout + settings.task_time_limit)
    unsent = timedelta(seconds=min(60, settings.visibility_timeout))
    return Lateness(unsent_for=unsent, stuck_for=stuck, stalled_for=stuck)


def retry_ceiling(settings: Settings) -> float:
    """The longest a retry may wait. A retry is a message the worker holds unacknowledged
    until it is due and then runs: its wait plus its attempt must stay under the visibility
    timeout, or the broker delivers it a second time meanwhile (Celery's ETA caveat). Half of
    what the time limit leaves of the timeout: no limit at the defaults (1,650 s against
    backoffs of at most 300 s), seconds in a test with a visibility timeout of a few."""
    return max(0.5, (settings.visibility_timeout - settings.task_time_limit) / 2)


def start_runtime(
    settings: Settings,
    registry: Registry,
    spec: ModelSpec,
    worker_name: str,
    send: Senders,
    metrics: WorkerMetrics | None = None,
) -> WorkerRuntime:
    """Load the model once, warm it, register it, and build the runners around it."""
    default = configured_spec(registry, settings.model)  # a bad LV_MODEL: before any loading
    backend = create_backend(spec)
    loading = time.monotonic()
    info = backend.load()
    if metrics is not None:
        metrics.load_seconds.labels(spec.model_id).set(time.monotonic() - loading)
    log.info("loaded %s on %s (%s): %s", spec.model_id, backend.device, backend.dtype, info)
    concurrency = worker_concurrency(settings, spec)
    # Many task threads share a few connections, each briefly; waiting for one is bounded.
    engine = make_engine(
        settings.require_database_url(),
        pool_size=min(concurrency, 16),
        pool_timeout=float(settings.task_time_limit),
        application_name=worker_name,
    )
    sessions = make_sessions(engine)
    with sessions.begin() as session:
        registered_models.ensure_model(session, spec)
        registered_models.record_default_model(session, default)
        registered_models.record_loaded(
            session, spec.model_id, embed_dim=info.embed_dim, scoring=info.scoring
        )
    start_index_build(engine, spec.model_id, info.embed_dim, settings.index_build_memory)
    max_size, max_wait = batch_limits(settings, spec)
    service = InferenceService(
        backend,
        max_size=max_size,
        max_wait_s=max_wait,
        input_path=settings.input_path,
        decode=settings.decode,
        max_pixels=settings.max_image_pixels,
        observe=metrics.model_call if metrics is not None else None,
        decode_processes=settings.decode_processes,
        pool_fetches=settings.pool_fetches,
    )
    thresholds = RecordedThresholds(sessions, spec.model_id, spec.threshold)
    scorer = make_scorer(settings, spec, service, thresholds)
    executor = ThreadPoolExecutor(max_workers=min(64, concurrency * 2), thread_name_prefix="fetch")

    # Claims and cache lookups: one self-contained statement each, on connections of their own.
    single = make_engine(
        settings.require_database_url(),
        pool_size=2,
        pool_timeout=float(settings.task_time_limit),
        application_name=worker_name,
        single_statements=True,
    )
    queries = SharedQueries(
        make_sessions(single),
        model_id=spec.model_id,
        worker=worker_name,
        max_attempts=settings.max_attempts,
        # An attempt ends by its time limit; a fetch started just before may overrun by its
        # own deadline, and the commit is given a moment: past all that it cannot be alive.
        attempt_limit=timedelta(seconds=settings.task_time_limit + settings.fetch_timeout + 10),
    )

    policy = fetch_policy(settings)
    model_timeout = float(settings.task_time_limit)
    analyzer = ListingAnalyzer(
        service, scorer, policy, settings.max_image_pixels, executor, queries.cached, model_timeout
    )
    mirror = start_mirror(settings, sessions, spec.model_id, metrics)
    runner = JobRunner(
        sessions=sessions,
        queries=queries,
        analyzer=analyzer,
        writer=OutcomeWriter(sessions, mirror),
        model_id=spec.model_id,
        worker_name=worker_name,
        max_attempts=settings.max_attempts,
        retry_backoff=settings.retry_backoff,
        time_limit=float(settings.task_time_limit),
        metrics=metrics,
        retry_ceiling=retry_ceiling(settings),
    )
    chunk_analyzer = ChunkAnalyzer(
        service,
        scorer,
        policy,
        settings.max_image_pixels,
        executor,
        queries.cached,
        spec.model_id,
        model_timeout,
        group_size=max_size,
    )
    # Groups of up to half a batch, enough of them at once for every batch the pipeline holds
    # (and a bound on the pixels held): one on the model while the next is fetched and
    # decoded; with a prepare step, one on the model, one prepared for it and one fetched.
    group_size = max(1, max_size // 2)
    batches_held = 3 if service.prepares else 2
    groups = JobGroups(
        runner,
        chunk_analyzer,
        send.resend,
        max_group=group_size,
        threads=max(2, -(-batches_held * max_size // group_size)),
    )
    chunks = ChunkRunner(
        engine=engine,
        analyzer=chunk_analyzer,
        worker_name=worker_name,
        max_attempts=settings.max_attempts,
        retry_backoff=settings.retry_backoff,
        send_chunks=send.chunks,
        time_limit=float(settings.task_time_limit),
        mirror=mirror,
        index_memory=settings.index_build_memory,
    )
    reconciler = Reconciler(sessions, send.jobs, send.chunks, spec.model_id, lateness(settings))
    stops = [
        start_stall_watchdog(service.batcher.busy_for, float(settings.task_time_limit)),
        reconciler.start(min(30.0, settings.visibility_timeout / 4)),
    ]
    return WorkerRuntime(spec, backend, service, runner, groups, chunks, executor, stops, mirror)


IndexOutcome = Literal["deferred", "present", "built", "busy"]


def build_index_if_due(engine: Engine, model_id: str, dim: int, memory: str | None) -> IndexOutcome:
    """Build the model's HNSW index if it has none (concurrently: other models' writers never
    wait), unless a reindex to this model is under way: that index is built once the backfill
    is done (db.embedding_index). `busy`: another process is building it."""
    with make_sessions(engine)() as session:
        if runs.reindex_target(session) == model_id:
            return "deferred"
        if embedding_index.index_state(session, model_id) == "valid":
            return "present"
    log.info("%s: building its HNSW index", model_id)
    return "built" if embedding_index.build_index(engine, model_id, dim, memory) else "busy"


def start_index_build(
    engine: Engine, model_id: str, dim: int, memory: str | None, retry_every: float = 30.0
) -> threading.Thread:
    """`build_index_if_due` in the background: the worker serves meanwhile (a model with a
    catalogue of rows and no index, after a cancelled reindex, takes long). While another
    process builds (this model's index or another's: one build at a time on the table), it
    tries again every `retry_every` seconds."""

    def build() -> None:
        try:
            while (outcome := build_index_if_due(engine, model_id, dim, memory)) == "busy":
                log.info("%s: HNSW index %s; trying again", model_id, _INDEX_OUTCOMES[outcome])
                time.sleep(retry_every)
            log.info("%s: HNSW index %s", model_id, _INDEX_OUTCOMES[outcome])
        except Exception as error:  # the worker serves without it; its next start tries again
            log.error("%s: could not build its HNSW index: %s", model_id, one_line(error))

    thread = threading.Thread(target=build, name="hnsw-index", daemon=True)
    thread.start()
    return thread


_INDEX_OUTCOMES: dict[IndexOutcome, str] = {
    "deferred": "waits for the reindex run's backfill",
    "present": "present",
    "built": "built",
    "busy": "not built yet: another process is building an index",
}


def start_mirror(
    settings: Settings,
    sessions: sessionmaker[Session],
    model_id: str,
    metrics: WorkerMetrics | None,
) -> MirrorHook:
    """The Milvus mirror's thread when `LV_MILVUS_URI` is set (docs/milvus-mirror.md)."""
    if settings.milvus_uri is None:
        return NO_MIRROR
    log.info("mirroring %s's embeddings to Milvus at %s", model_id, settings.milvus_uri)
    registry = metrics.registry if metrics is not None else None
    return MirrorWriter(sessions, lambda: open_store(settings), model_id, registry=registry)


def make_scorer(
    settings: Settings, spec: ModelSpec, service: InferenceService, thresholds: ThresholdSource
) -> ListingScorer:
    """The scorer of a loaded model: its category index (text models only, embedded through
    `service`) and its thresholds."""
    info = service.backend.info
    categories = None
    if info.has_text:
        labels = read_categories(settings.categories_file)
        categories = CategoryIndex(labels, spec.prompt_templates, service.embed_texts)
    return ListingScorer(info, categories, thresholds)


def fetch_policy(settings: Settings) -> FetchPolicy:
    """The fetch rules the settings ask for (size, deadline, private networks, file roots)."""
    return FetchPolicy(
        max_bytes=settings.max_image_bytes,
        timeout=settings.fetch_timeout,
        allowed_private_networks=settings.allowed_private_networks,
        file_roots=settings.file_roots,
    )
