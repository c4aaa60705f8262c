"""A job's life in the worker: claim it, analyse its listing, record exactly one outcome.

Plain Python (no Celery): the task in `worker.tasks` only turns a `JobReport` into an ack or a
retry. Every path ends in one committed outcome or a scheduled retry, never in silence.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import ListingError, TransientError, one_line
from db import jobs, listings
from db.jobs import ClaimedJob, Unclaimable
from db.records import JobOutcome, ListingOutcome, ResultRecord
from worker.analysis import ListingAnalysis, ListingAnalyzer
from worker.inference import Ticket
from worker.live_jobs import LiveJobs
from worker.metrics import WorkerMetrics
from worker.outcomes import OutcomeWriter
from worker.retries import backoff_seconds
from worker.shared_queries import SharedQueries

log = logging.getLogger(__name__)
REVOKED = "revoked by an operator"
WRITE_TIMEOUT = 120.0  # seconds; statements and lock waits have their own, shorter limits


@dataclass(frozen=True)
class JobReport:
    """What the task hands back to Celery: a short summary (shown in Flower) or a retry delay."""

    summary: dict[str, Any] = field(default_factory=dict)
    retry_in: float | None = None


@dataclass(frozen=True)
class _Attempt:
    """Which attempt of which job, on which version of its listing: what fences its write."""

    job_id: uuid.UUID
    listing_id: str
    number: int
    version: datetime | None

    @classmethod
    def of(cls, claim: ClaimedJob) -> _Attempt:
        listing = claim.listing
        return cls(claim.job_id, listing.listing_id, claim.attempt, listing.updated_at)


@dataclass
class JobRunner:
    """Runs deliveries of jobs against the database and the warm analyzer."""

    sessions: sessionmaker[Session]
    queries: SharedQueries
    analyzer: ListingAnalyzer
    writer: OutcomeWriter
    model_id: str
    worker_name: str
    max_attempts: int
    retry_backoff: float
    time_limit: float = 300.0  # LV_TASK_TIME_LIMIT: one attempt, from its claim to its commit
    metrics: WorkerMetrics | None = None
    # The longest a retry may wait (see `worker.runtime.retry_ceiling`).
    retry_ceiling: float = float("inf")
    # Held by the one interrupted job (an earlier attempt never finished) running at a time.
    _alone: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # The jobs a thread of this process claims or runs now (shared with the job groups).
    live: LiveJobs = field(default_factory=LiveJobs, init=False, repr=False)

    def run(self, job_id: uuid.UUID, redeliveries: int = 0) -> JobReport:
        """Run one delivery of `job_id`. Database trouble (an outage, a lock or pool timeout)
        and anything unforeseen become a retry, never an acknowledged, forgotten job; the wait
        grows with `redeliveries` (this job's Celery retries so far), since an outage that
        outlasts one retry tends to outlast the next."""
        report = self._run_safely(job_id, redeliveries)
        if report.retry_in is not None and report.retry_in > self.retry_ceiling:
            return JobReport(report.summary, self.retry_ceiling)
        return report

    def _run_safely(self, job_id: uuid.UUID, redeliveries: int) -> JobReport:
        try:
            # A second delivery of a job live in this process waits for that attempt (and then
            # finds it finished) instead of claiming it as interrupted and costing it an attempt.
            with self.live.holding(job_id, self.time_limit + WRITE_TIMEOUT) as held:
                if held:
                    return self._run(job_id)
            log.warning("job %s: its attempt in this worker is still running, will retry", job_id)
        except (SQLAlchemyError, FutureTimeout) as error:
            log.warning("job %s: database trouble, will retry: %s", job_id, one_line(error))
        except Exception:
            log.exception("job %s: unexpected error outside the analysis, will retry", job_id)
        return JobReport(retry_in=backoff_seconds(redeliveries + 2, self.retry_backoff))

    def mark_resent(self, job_id: uuid.UUID) -> None:
        """The retry message is in the broker again (the reconciler skips the job). Best effort:
        with the database away, the reconciler may later send the job once more (harmless)."""
        try:
            with self.sessions.begin() as session:
                jobs.mark_sent(session, [job_id])
        except SQLAlchemyError as error:
            log.warning("job %s: could not record the retry as sent: %s", job_id, one_line(error))

    def revoked(self, job_id: uuid.UUID) -> None:
        """An operator revoked the job's task (Flower, `celery control revoke`): Celery discards
        the message, so the job would stay `queued` forever. It ends `failed` with its row."""
        try:
            with self.sessions() as session:
                active = jobs.active_attempt(session, job_id)
                if active is None:
                    return
                listing = listings.get_listing(session, active[0])
            version = listing.updated_at if listing else None
            analysis = ListingAnalysis(ResultRecord("failed", REVOKED), [])
            self._record(_Attempt(job_id, active[0], active[1], version), "failed", analysis)
            log.info("job %s revoked by an operator: recorded as failed", job_id)
        except (SQLAlchemyError, FutureTimeout) as error:
            # Left queued: the reconciler re-sends it later, and it then runs normally.
            log.warning("job %s: could not record its revocation: %s", job_id, one_line(error))

    def _run(self, job_id: uuid.UUID) -> JobReport:
        # Announced from its delivery on: a batch waits for the jobs still claiming, fetching
        # and decoding, and for no one else.
        with self.analyzer.service.coming() as ticket:
            report = self._attempt(job_id, ticket, self.queries.claim)
        if report is not None:
            return report
        # An earlier attempt never finished: its worker may have died of this very job. It is
        # claimed and run only when no other such job runs in this process, so a job that
        # kills its worker every time costs the jobs in flight with it one attempt, once,
        # instead of taking them all to their cap with it.
        with self._alone, self.analyzer.service.coming() as ticket:
            report = self._attempt(job_id, ticket, self.queries.claim_interrupted)
        assert report is not None  # an interrupted claim never answers "interrupted"
        return report

    def _attempt(
        self,
        job_id: uuid.UUID,
        ticket: Ticket,
        claim_job: Callable[[uuid.UUID], ClaimedJob | Unclaimable],
    ) -> JobReport | None:
        """One attempt; None when the job is `interrupted` (to be claimed on its own)."""
        started = time.monotonic()
        claim = claim_job(job_id)
        if isinstance(claim, Unclaimable):
            return None if claim.reason == "interrupted" else self.unclaimable(job_id, claim)
        claimed = time.monotonic()
        deadline = claimed + self.time_limit
        try:
            analysis = self.analyzer.analyze(claim.listing, deadline, ticket)
        except ListingError as error:
            analysis = ListingAnalysis(ResultRecord("failed", one_line(error)), [])
        except Exception as error:  # transient, or a bug: retried, then dead, never silent
            return self.after_transient(claim, error)
        analysed = time.monotonic()
        status = "succeeded" if analysis.result.status == "ok" else "failed"
        if not self._record(_Attempt.of(claim), status, analysis, deadline):
            return _superseded(claim)
        seconds = {
            "claim": claimed - started,
            "analysis": analysed - claimed,
            "write": time.monotonic() - analysed,
        }
        self.finished(claim, status, seconds, analysis.batch_size, analysis.seconds)
        return JobReport(summary_of(claim.listing.listing_id, analysis.result))

    def finished(
        self,
        claim: ClaimedJob,
        status: str,
        seconds: dict[str, float],
        batch_size: int | None,
        stages: dict[str, float] | None = None,
    ) -> None:
        """A committed outcome's metrics and its one log line; `seconds`: claim, analysis,
        write; `stages`: the analysis's own (fetch, decode, infer), where known."""
        if self.metrics is not None:
            observed = {"claim": seconds["claim"], **(stages or {}), "write": seconds["write"]}
            if claim.waited is not None:
                observed["queue_wait"] = claim.waited
            self.metrics.job(status, observed)
        fields = {
            "job_id": str(claim.job_id),
            "listing_id": claim.listing.listing_id,
            "model_id": self.model_id,
            "outcome": status,
            "attempt": claim.attempt,
            **{f"{stage}_ms": round(1000 * value, 1) for stage, value in seconds.items()},
            "batch_size": batch_size,
        }
        log.info("job %s %s", claim.job_id, status, extra={"fields": fields})

    def after_transient(self, claim: ClaimedJob, error: Exception) -> JobReport:
        message = one_line(error)
        if not isinstance(error, TransientError):
            log.exception("job %s: unexpected error", claim.job_id)
            message = f"internal error: {type(error).__name__}: {message}"
        if self.metrics is not None:
            self.metrics.job("dead" if claim.attempt >= self.max_attempts else "retried", {})
        if claim.attempt >= self.max_attempts:
            reason = f"gave up after {claim.attempt} attempts: {message}"
            analysis = ListingAnalysis(ResultRecord("failed", reason), [])
            self._record(_Attempt.of(claim), "dead", analysis)
            return JobReport(summary_of(claim.listing.listing_id, analysis.result))
        with self.sessions.begin() as session:
            if not jobs.note_retry(session, claim.job_id, claim.attempt, message):
                return _superseded(claim)
        delay = backoff_seconds(claim.attempt, self.retry_backoff)
        log.info(
            "job %s: attempt %d failed, retry in %.1fs: %s",
            claim.job_id,
            claim.attempt,
            delay,
            message,
        )
        return JobReport(retry_in=delay)

    def unclaimable(self, job_id: uuid.UUID, why: Unclaimable) -> JobReport:
        if why.reason == "running":
            # Its last attempt is live elsewhere, or it was stranded (a worker died, its write
            # failed): keep this delivery until that attempt must have ended, then look again
            # (finished, or exhausted and recorded dead). Never acknowledged and dropped.
            return JobReport(retry_in=why.live_for_more + 1.0)
        if why.reason == "unknown":
            return JobReport(retry_in=backoff_seconds(2, self.retry_backoff))
        if why.reason != "exhausted" or why.listing_id is None:
            log.info("job %s not run: %s", job_id, why.reason)
            return JobReport({"skipped": why.reason})
        # Its attempts ran out while it was running: the worker died mid-job every time.
        last = why.last_error or "the worker stopped during every attempt"
        reason = f"gave up after {why.attempts} attempts: {last}"
        with self.sessions() as session:
            listing = listings.get_listing(session, why.listing_id)
        version = listing.updated_at if listing else None
        analysis = ListingAnalysis(ResultRecord("failed", reason), [])
        self._record(_Attempt(job_id, why.listing_id, why.attempts, version), "dead", analysis)
        return JobReport(summary_of(why.listing_id, analysis.result))

    def _record(
        self,
        attempt: _Attempt,
        status: str,
        analysis: ListingAnalysis,
        deadline: float | None = None,
    ) -> bool:
        """Commit the attempt's outcome; False when a later attempt holds the job (nothing
        written)."""
        listing = ListingOutcome(
            listing_id=attempt.listing_id,
            model_id=self.model_id,
            result=analysis.result,
            listing_updated_at=attempt.version,
            images=analysis.images,
            new_embeddings=analysis.new_embeddings,
            job_id=attempt.job_id,
        )
        outcome = JobOutcome(attempt.job_id, attempt.number, status, listing, analysis.batch_size)
        # The commit too must come within the attempt's time (at least a moment to try): past
        # it, the job is retried, and a write that still commits later is fenced by attempt.
        wait = WRITE_TIMEOUT if deadline is None else max(1.0, deadline - time.monotonic())
        if self.writer.write(outcome, timeout=min(WRITE_TIMEOUT, wait)):
            return True
        log.info("job %s attempt %d superseded: nothing written", attempt.job_id, attempt.number)
        return False


def _superseded(claim: ClaimedJob) -> JobReport:
    """An attempt overtaken by a later one (a redelivery claimed the job meanwhile): it wrote
    nothing and reports no outcome, so logs, metrics and Flower count each job's outcome once."""
    return JobReport({"listing_id": claim.listing.listing_id, "skipped": "superseded"})


def summary_of(listing_id: str, result: ResultRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {"listing_id": listing_id, "status": result.status}
    if result.error:
        summary["error"] = result.error
    if result.similarity is not None:
        summary["similarity"] = round(result.similarity, 4)
        summary["is_match"] = result.is_match
        summary["top_category"] = result.top_category
    return summary
