"""The Milvus mirror in a worker: new embeddings are copied after their commit, off the job's
path, by one thread per process.

A job is acknowledged when PostgreSQL has its rows; the mirror never delays or fails that. The
commit hands the new embeddings' SHA-256s to `MirrorWriter.written` (a set update under a lock,
never blocking, never raising); the mirror thread takes everything waiting at once, reads the
vectors back from pgvector and upserts them in pages. While Milvus is away the SHA-256s wait
(up to `max_backlog`, then they are dropped and counted) and the thread retries with backoff;
whatever a worker drops or loses by stopping, `listing-vision mirror` catches up from pgvector.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import one_line
from db.milvus import MilvusStore
from db.mirror import copy_to_mirror, model_dimension, sync_alias
from db.records import ListingOutcome

log = logging.getLogger(__name__)
MAX_BACKLOG = 200_000  # SHA-256s waiting per process (~30 MB); more are left to the catch-up
RETRY_MAX = 60.0  # seconds between attempts while Milvus is away
_REPEAT_WARNING = 300.0  # seconds between reminders that the mirror is still behind


class MirrorHook(Protocol):
    """What the job and chunk writers tell the mirror; neither call blocks nor raises."""

    def written(self, outcomes: Sequence[ListingOutcome]) -> None:
        """`outcomes` were committed (their new embeddings are in pgvector)."""

    def switched(self) -> None:
        """The active model may have changed: the alias should follow it."""

    def close(self) -> None:
        """Stop, after one last attempt to write what waits."""


class NoMirror:
    """`LV_MILVUS_URI` unset: nothing to mirror."""

    def written(self, outcomes: Sequence[ListingOutcome]) -> None:
        pass

    def switched(self) -> None:
        pass

    def close(self) -> None:
        pass


NO_MIRROR = NoMirror()


@dataclass
class MirrorStats:
    """Counts since the process started (also exported as `lv_mirror_*` metrics)."""

    written: int = 0
    failures: int = 0
    dropped: int = 0
    backlog: int = 0


class _Metrics:
    def __init__(self, registry: CollectorRegistry, model_id: str) -> None:
        self.written = Counter(
            "lv_mirror_written", "Embeddings upserted into Milvus", ("model",), registry=registry
        ).labels(model_id)
        self.failures = Counter(
            "lv_mirror_failures",
            "Attempts to write to Milvus that failed (the embeddings wait and are retried)",
            ("model",),
            registry=registry,
        ).labels(model_id)
        self.dropped = Counter(
            "lv_mirror_dropped",
            "Embeddings not mirrored by this worker (backlog full): `listing-vision mirror`",
            ("model",),
            registry=registry,
        ).labels(model_id)
        self.backlog = Gauge(
            "lv_mirror_backlog", "Embeddings waiting for Milvus", ("model",), registry=registry
        ).labels(model_id)


class MirrorWriter:
    """Copies a worker's committed embeddings to Milvus in a thread of its own."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        connect: Callable[[], MilvusStore],
        model_id: str,
        *,
        registry: CollectorRegistry | None = None,
        max_backlog: int = MAX_BACKLOG,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self._sessions = sessions
        self._connect = connect
        self.model_id = model_id
        self._max_backlog = max_backlog
        self._retry_max = retry_max
        self.stats = MirrorStats()
        self._metrics = _Metrics(registry, model_id) if registry is not None else None
        self._lock = threading.Lock()
        self._pending: dict[str, set[str]] = defaultdict(set)
        self._alias_due = True  # at start: the alias may have missed a switch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._store: MilvusStore | None = None
        self._dims: dict[str, int] = {}
        self._behind_since: float | None = None
        self._last_warning = 0.0
        self._wake.set()  # create the model's collection and check the alias at once
        self._thread = threading.Thread(target=self._run, name="milvus-mirror", daemon=True)
        self._thread.start()

    # --- called by the writers (any thread) ------------------------------------------------

    def written(self, outcomes: Sequence[ListingOutcome]) -> None:
        try:
            for outcome in outcomes:
                if outcome.new_embeddings:
                    self.submit(outcome.model_id, outcome.new_embeddings)
        except Exception:  # the commit it follows has happened: never let the mirror undo it
            log.exception("Milvus mirror: could not queue embeddings")

    def submit(self, model_id: str, shas: Iterable[str]) -> None:
        """Queue SHA-256s to copy; past `max_backlog` they are dropped (and counted)."""
        dropped = 0
        with self._lock:
            waiting = self._pending[model_id]
            for sha in shas:
                if sha in waiting:
                    continue
                if self.stats.backlog >= self._max_backlog:
                    dropped += 1
                    continue
                waiting.add(sha)
                self.stats.backlog += 1
            self.stats.dropped += dropped
        self._observe(dropped=dropped)
        if dropped:
            self._warn(f"backlog full: {dropped} embedding(s) of {model_id} not queued")
        self._wake.set()

    def switched(self) -> None:
        with self._lock:
            self._alias_due = True
        self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop; what is waiting gets one last attempt (bounded by the store's timeout)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # --- the mirror thread ----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._write_waiting():
                failures = 0
                continue
            failures += 1
            self._stop.wait(min(self._retry_max, 0.5 * 2**failures))
            self._wake.set()
        if self.stats.backlog:
            self._write_waiting()
        if self._store is not None:
            self._store.close()
        if self.stats.backlog:
            log.warning(
                "Milvus mirror stopped with %d embedding(s) not mirrored: "
                "`listing-vision mirror` copies them from pgvector",
                self.stats.backlog,
            )

    def _write_waiting(self) -> bool:
        """One attempt at everything waiting; False (and it waits again) on any failure.

        What waits stays queued until it is written, so the writers never queue it twice."""
        with self._lock:
            work = {model_id: set(shas) for model_id, shas in self._pending.items() if shas}
            alias, self._alias_due = self._alias_due, False
        if not work and not alias and self._store is not None:
            return True
        try:
            store = self._store or self._connect()
            self._store = store
            self._ensure(store, self.model_id)
            for model_id in sorted(work):
                self._ensure(store, model_id)
                written = copy_to_mirror(self._sessions, store, model_id, sorted(work[model_id]))
                with self._lock:
                    self._pending[model_id] -= work[model_id]
                    self.stats.written += written
                    self.stats.backlog = sum(len(shas) for shas in self._pending.values())
                self._observe(written=written)
            if alias:
                with self._sessions() as session:
                    sync_alias(session, store)
        except Exception as error:
            if alias:
                self.switched()
            self._failed(error)
            return False
        if self._behind_since is not None:
            log.warning(
                "Milvus mirror caught up after %.0f s", time.monotonic() - self._behind_since
            )
            self._behind_since = None
        return True

    def _ensure(self, store: MilvusStore, model_id: str) -> None:
        """The model's collection exists (its dimension as its worker recorded it)."""
        dim = self._dims.get(model_id)
        if dim is None:
            with self._sessions() as session:
                dim = model_dimension(session, model_id)
            if dim is None:
                return
            self._dims[model_id] = dim
        store.ensure_collection(model_id, dim)

    def _failed(self, error: Exception) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        with self._lock:
            self.stats.failures += 1
        if self._metrics is not None:
            self._metrics.failures.inc()
        if self._behind_since is None:
            self._behind_since = time.monotonic()
            self._last_warning = 0.0
        self._warn(f"{one_line(error)}; {self.stats.backlog} embedding(s) wait, retrying")

    def _warn(self, message: str) -> None:
        """At most one line per outage every few minutes: the mirror is behind, jobs are not."""
        now = time.monotonic()
        if now - self._last_warning < _REPEAT_WARNING:
            return
        self._last_warning = now
        log.warning("Milvus mirror behind (jobs are not affected): %s", message)

    def _observe(self, *, written: int = 0, dropped: int = 0) -> None:
        if self._metrics is None:
            return
        self._metrics.written.inc(written)
        self._metrics.dropped.inc(dropped)
        self._metrics.backlog.set(self.stats.backlog)
