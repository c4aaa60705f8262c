"""Everything one worker process keeps warm: the model, its batcher, categories, connections."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from db import embeddings, models
from db.embeddings import CachedImage
from db.engine import make_engine, make_sessions
from listing_vision.settings import Settings
from worker.analysis import ListingAnalyzer
from worker.categories import CategoryIndex, read_categories
from worker.fetch import FetchPolicy
from worker.inference import InferenceService
from worker.models.base import ModelBackend
from worker.models.loading import create_backend
from worker.models.registry import ModelSpec
from worker.pipeline import JobRunner

log = logging.getLogger(__name__)
STALL_EXIT_CODE = 70


@dataclass
class WorkerRuntime:
    spec: ModelSpec
    backend: ModelBackend
    service: InferenceService
    runner: JobRunner
    executor: ThreadPoolExecutor

    def close(self) -> None:
        self.service.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def batch_limits(settings: Settings, spec: ModelSpec) -> tuple[int, float]:
    """The registry entry's batch size and wait, else the `LV_BATCH_*` defaults."""
    size = spec.batch_max_size or settings.batch_max_size
    wait_ms = spec.batch_max_wait_ms
    return size, (settings.batch_max_wait_ms if wait_ms is None else wait_ms) / 1000.0


def worker_concurrency(settings: Settings, spec: ModelSpec) -> int:
    """Enough task threads to fill one batch while the previous one runs."""
    return settings.worker_concurrency or 2 * batch_limits(settings, spec)[0]


def start_runtime(
    settings: Settings, spec: ModelSpec, database_url: str, worker_name: str
) -> WorkerRuntime:
    """Load the model once, warm it, register it, and build the job runner around it."""
    backend = create_backend(spec)
    info = backend.load()
    log.info("loaded %s on %s (%s): %s", spec.model_id, backend.device, backend.dtype, info)
    concurrency = worker_concurrency(settings, spec)
    engine = make_engine(database_url, pool_size=min(concurrency, 16), application_name=worker_name)
    sessions = make_sessions(engine)
    with sessions.begin() as session:
        models.ensure_model(
            session,
            spec.model_id,
            backend=spec.backend,
            name=spec.name,
            pretrained=spec.pretrained,
            threshold=spec.threshold,
        )
        models.record_loaded(session, spec.model_id, embed_dim=info.embed_dim, scoring=info.scoring)
        embeddings.ensure_hnsw_index(session, spec.model_id, info.embed_dim)
    max_size, max_wait = batch_limits(settings, spec)
    service = InferenceService(backend, max_size=max_size, max_wait_s=max_wait)
    categories = None
    if info.has_text:
        labels = read_categories(settings.categories_file)
        categories = CategoryIndex(labels, spec.prompt_templates, service.embed_texts)
    executor = ThreadPoolExecutor(max_workers=min(64, concurrency * 2), thread_name_prefix="fetch")

    def lookup_cached(shas: Sequence[str]) -> dict[str, CachedImage]:
        with sessions() as session:
            return embeddings.cached_images(session, shas, spec.model_id)

    analyzer = ListingAnalyzer(
        service=service,
        categories=categories,
        threshold=spec.threshold,
        policy=fetch_policy(settings),
        max_pixels=settings.max_image_pixels,
        executor=executor,
        lookup_cached=lookup_cached,
        model_timeout=float(settings.task_time_limit),
    )
    runner = JobRunner(
        sessions=sessions,
        analyzer=analyzer,
        model_id=spec.model_id,
        worker_name=worker_name,
        max_attempts=settings.max_attempts,
        retry_backoff=settings.retry_backoff,
    )
    _start_stall_watchdog(service, float(settings.task_time_limit))
    return WorkerRuntime(spec, backend, service, runner, executor)


def fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=settings.max_image_bytes,
        timeout=settings.fetch_timeout,
        allowed_private_networks=settings.allowed_private_networks,
        file_roots=settings.file_roots,
    )


def _start_stall_watchdog(service: InferenceService, limit: float) -> None:
    """A model call stuck past the time limit cannot be interrupted from Python: exit, so the
    unacknowledged jobs are delivered again and a supervisor starts a fresh process."""

    def watch() -> None:
        while not stop.wait(min(5.0, limit / 4)):
            stuck = service.batcher.busy_for()
            if stuck > limit:
                log.critical("model call stuck for %.0fs (limit %.0fs): exiting", stuck, limit)
                logging.shutdown()
                os._exit(STALL_EXIT_CODE)

    stop = threading.Event()
    threading.Thread(target=watch, name="stall-watchdog", daemon=True).start()
