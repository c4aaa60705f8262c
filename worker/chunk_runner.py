"""A run's chunk in the worker: claim it, analyse its listings together, record their outcomes,
finish it, and complete the run when it was the last.

Plain Python (no Celery), like `job_runner`: the task only turns a `ChunkReport` into an ack or
a retry. The guarantees of single jobs hold per listing: one outcome each, fenced writes (the
chunk's delivery number), a bad listing fails alone, transient failures are retried per listing
(a chunk of the next generation), and a chunk redelivered after its worker died is split in
halves until a listing that kills workers is alone, then it ends `failed` after the cap.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import TransientError, one_line
from db import runs
from db.engine import make_sessions
from db.listing_state import StoredListing, load_listings
from db.records import ListingOutcome, ResultRecord
from db.results import write_listing_outcomes
from db.run_completion import complete_run, finish_restamp
from db.runs import ClaimedChunk, NewChunk
from worker.chunk_analysis import ChunkAnalysis, ChunkAnalyzer
from worker.mirror import NO_MIRROR, MirrorHook
from worker.retries import backoff_seconds

log = logging.getLogger(__name__)
SendChunks = Callable[[Sequence[uuid.UUID], float | None], None]


@dataclass(frozen=True)
class ChunkReport:
    """What the task hands back to Celery: a short summary (shown in Flower) or a retry delay."""

    summary: dict[str, Any] = field(default_factory=dict)
    retry_in: float | None = None


@dataclass
class ChunkRunner:
    """Runs deliveries of run chunks against the database and the warm chunk analyzer."""

    engine: Engine
    analyzer: ChunkAnalyzer
    worker_name: str
    max_attempts: int
    retry_backoff: float
    send_chunks: SendChunks
    # LV_TASK_TIME_LIMIT: a delivery's fetches and model waits end this long after its claim;
    # listings not fetched by then are retried in a chunk of their own, and a model wait past
    # it retries the whole chunk (split in halves on its next delivery).
    time_limit: float
    # A chunk is a batch already: two at a time keep the model and the database busy, and more
    # would only contend for the GIL and the connections with the single jobs.
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))
    mirror: MirrorHook = NO_MIRROR  # told what was committed, and of a reindex's switch
    index_memory: str | None = None  # LV_INDEX_BUILD_MEMORY, for a reindex's index build
    sessions: sessionmaker[Session] = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = make_sessions(self.engine)

    def run(self, chunk_id: uuid.UUID, redeliveries: int = 0) -> ChunkReport:
        """Run one delivery of a chunk. Trouble outside the listings' own analyses (the database
        away, the model not answering) retries the whole chunk, whose next delivery is split."""
        try:
            with self.slots:
                return self._run(chunk_id)
        except (SQLAlchemyError, FutureTimeout) as error:
            log.warning("chunk %s: database trouble, will retry: %s", chunk_id, one_line(error))
        except TransientError as error:
            log.warning("chunk %s: %s; will retry, split", chunk_id, one_line(error))
        except Exception:
            log.exception("chunk %s: unexpected error, will retry", chunk_id)
        return ChunkReport(retry_in=backoff_seconds(redeliveries + 2, self.retry_backoff))

    def _run(self, chunk_id: uuid.UUID) -> ChunkReport:
        with self.sessions.begin() as session:
            claim = runs.claim_chunk(session, chunk_id, self.worker_name)
        if isinstance(claim, str):
            log.info("chunk %s not run: %s", chunk_id, claim)
            return ChunkReport({"skipped": claim})
        deadline = time.monotonic() + self.time_limit
        if claim.attempt > 1 and len(claim.listing_ids) > 1:
            return self._split(claim)
        clock = _Stopwatch()
        with self.sessions() as session:
            stored = load_listings(session, claim.listing_ids, claim.model_id)
        clock.lap("read")
        if claim.attempt > self.max_attempts:
            reason = "the worker stopped during every attempt"
            analysis = ChunkAnalysis(transient=dict.fromkeys(stored, reason))
        else:
            analysis = self.analyzer.analyze(
                stored, refetch=claim.refetch, recompute=claim.recompute, deadline=deadline
            )
        clock.lap("analyse")
        report = self._record(claim, stored, analysis)
        clock.lap("write")
        return ChunkReport({**report.summary, "seconds": clock.laps}, report.retry_in)

    def _split(self, claim: ClaimedChunk) -> ChunkReport:
        """A redelivery: its last worker may have died on one of these listings."""
        with self.sessions.begin() as session:
            halves = runs.split_chunk(session, claim)
        if halves:
            self._send([half.chunk_id for half in halves], None)
            log.warning(
                "chunk %s redelivered (attempt %d): split into %d and %d listings",
                claim.chunk_id,
                claim.attempt,
                len(halves[0].listing_ids),
                len(halves[1].listing_ids),
            )
        return ChunkReport({"run_id": str(claim.run_id), "split": len(halves)})

    def _record(
        self, claim: ClaimedChunk, stored: dict[str, StoredListing], analysis: ChunkAnalysis
    ) -> ChunkReport:
        retry, dead = self._retry_or_give_up(claim, stored, analysis)
        missing = len(set(claim.listing_ids) - set(stored))  # nothing left to analyse
        done = analysis.ok + missing
        failed = analysis.failed + len(dead)
        with self.sessions.begin() as session:
            if not runs.finish_chunk(session, claim, done=done, failed=failed, retry=retry):
                log.info("chunk %s superseded: nothing written", claim.chunk_id)
                return ChunkReport({"skipped": "superseded"})
            write_listing_outcomes(session, [*analysis.outcomes, *dead])
            runs.add_progress(session, claim.run_id, done=done, failed=failed)
        self.mirror.written(analysis.outcomes)
        if retry is not None:
            self._send([retry.chunk_id], backoff_seconds(claim.generation, self.retry_backoff))
        if claim.kind == "reindex":  # its completion builds an index first: not in this task
            threading.Thread(
                target=self._complete_run, args=(claim.run_id,), name="run-completion", daemon=True
            ).start()
        else:
            self._complete_run(claim.run_id)
        return ChunkReport(
            {
                "run_id": str(claim.run_id),
                "listings": len(claim.listing_ids),
                "ok": done,
                "failed": failed,
                "unchanged": analysis.unchanged,
                "retrying": len(retry.listing_ids) if retry else 0,
            }
        )

    def _retry_or_give_up(
        self, claim: ClaimedChunk, stored: dict[str, StoredListing], analysis: ChunkAnalysis
    ) -> tuple[NewChunk | None, list[ListingOutcome]]:
        """Transient failures: a chunk of the next generation, or after the cap a `failed` row
        each (their jobs' `dead`)."""
        if not analysis.transient:
            return None, []
        if claim.generation < self.max_attempts and claim.attempt <= self.max_attempts:
            ids = sorted(analysis.transient)
            return NewChunk(uuid.uuid4(), ids, claim.generation + 1), []
        attempts = max(claim.generation, claim.attempt - 1)
        dead = [
            ListingOutcome(
                listing_id=listing_id,
                model_id=claim.model_id,
                result=ResultRecord("failed", f"gave up after {attempts} attempts: {why}"),
                listing_updated_at=stored[listing_id].listing.updated_at,
            )
            for listing_id, why in sorted(analysis.transient.items())
        ]
        return None, dead

    def _send(self, chunk_ids: list[uuid.UUID], countdown: float | None) -> None:
        """Publish, then record them as sent. Best effort: an unsent chunk is the reconciler's."""
        try:
            self.send_chunks(chunk_ids, countdown)
            with self.sessions.begin() as session:
                runs.mark_chunks_sent(session, chunk_ids)
        except Exception as error:
            log.warning("could not send chunks %s now: %s", chunk_ids, one_line(error))

    def _complete_run(self, run_id: uuid.UUID) -> None:
        """Complete the run if this was its last chunk. Trouble here is not the chunk's (it is
        recorded): logged, and beat's watch completes the run later."""
        try:
            completed = complete_run(self.engine, run_id, self.index_memory)
        except Exception as error:
            log.warning("run %s not completed now (beat's watch will): %s", run_id, one_line(error))
            return
        if completed is None:
            return
        log.info("run %s (%s of %s) succeeded", run_id, completed.kind, completed.model_id)
        if completed.kind == "reindex":
            self.mirror.switched()
            log.warning(
                "reindex run %s: the active model is now %s (was %s); restamping its rows",
                run_id,
                completed.model_id,
                completed.replaced_model_id,
            )
            log.info("run %s: %d rows restamped", run_id, finish_restamp(self.engine))


class _Stopwatch:
    """Seconds spent in each stage of a chunk (shown with its result, in Flower and the log)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now
