"""A group message's jobs (one `enqueue` call's events, LV_ENQUEUE_GROUP at a time), run together.

One delivery, one claim statement, one fetch-decode-embed pass over all their images (the run
chunks' analyzer), one commit: the per-job costs of a single job (a Celery message, thread
hand-offs at the claim, the batcher and the writer) are paid once per group. Each job keeps its
own attempt, outcome, log line and metrics. Whatever a job cannot finish here goes back to the
broker as a plain single-job message, where the single path's rules apply unchanged:

- a job whose earlier attempt never finished (`interrupted`: perhaps it killed its worker) runs
  alone there, so a poison listing no longer takes its group with it;
- a transient failure is retried there after its backoff (or recorded `dead` at the cap);
- a job whose attempt is live elsewhere is looked at again once that attempt must have ended.

Database trouble before the outcomes are committed retries the whole message; its jobs then
come back `interrupted` and each goes its own way.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from contract.errors import TransientError, one_line
from db import jobs
from db.jobs import ClaimedJob
from db.records import JobOutcome
from worker.chunk_analysis import ChunkAnalyzer
from worker.job_runner import WRITE_TIMEOUT, JobRunner
from worker.retries import backoff_seconds

log = logging.getLogger(__name__)

# Publish jobs again as single-job messages, after `countdown` seconds (None: now).
ResendJobs = Callable[[Sequence[uuid.UUID], float | None], None]


@dataclass(frozen=True)
class GroupReport:
    """What the group task hands back to Celery: counts (shown in Flower) or a retry delay."""

    summary: dict[str, Any] = field(default_factory=dict)
    retry_in: float | None = None


@dataclass
class JobGroupRunner:
    """Runs deliveries of group messages; `runner` is the single-job runner whose rules
    (records, retries, the unclaimable) each job still follows."""

    runner: JobRunner
    analyzer: ChunkAnalyzer
    resend: ResendJobs
    # Groups analysed at once: enough to fill the next batch while one runs, and a bound on
    # the pixels held (each group fetches and decodes all its images before embedding them).
    in_flight: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(8))

    def run(self, job_ids: Sequence[uuid.UUID], redeliveries: int = 0) -> GroupReport:
        """Run one delivery of a group message."""
        try:
            with self.in_flight:
                return self._run(job_ids)
        except (SQLAlchemyError, FutureTimeout) as error:
            log.warning("group of %d jobs: database trouble, will retry: %s", len(job_ids), error)
        except Exception:
            log.exception("group of %d jobs: unexpected error, will retry", len(job_ids))
        delay = backoff_seconds(redeliveries + 2, self.runner.retry_backoff)
        return GroupReport(retry_in=min(delay, self.runner.retry_ceiling))

    def _run(self, job_ids: Sequence[uuid.UUID]) -> GroupReport:
        runner = self.runner
        started = time.monotonic()
        answers = runner.queries.claim_now(job_ids)
        claimed_at = time.monotonic()
        claims: dict[str, ClaimedJob] = {}
        later: dict[uuid.UUID, float | None] = {}  # job -> countdown of its single message
        summary = {"jobs": len(job_ids), "succeeded": 0, "failed": 0, "resent": 0}
        for job_id, answer in answers.items():
            if isinstance(answer, ClaimedJob) and answer.listing.listing_id not in claims:
                claims[answer.listing.listing_id] = answer
            elif isinstance(answer, ClaimedJob) or answer.reason == "interrupted":
                # A second job of one listing, or one whose last attempt never finished:
                # alone, as a single job (which claims an interrupted job on its own).
                later[job_id] = None
            else:
                report = runner.unclaimable(job_id, answer)
                if report.retry_in is not None:
                    later[job_id] = report.retry_in
        if claims:
            self._analyse_and_write(claims, claimed_at - started, later, summary)
        self._send_back(later)
        summary["resent"] = len(later)
        return GroupReport(summary)

    def _analyse_and_write(
        self,
        claims: dict[str, ClaimedJob],
        claim_seconds: float,
        later: dict[uuid.UUID, float | None],
        summary: dict[str, int],
    ) -> None:
        runner = self.runner
        claimed_at = time.monotonic()
        try:
            listings = [claim.listing for claim in claims.values()]
            found = self.analyzer.analyze_new(listings, claimed_at + runner.time_limit)
        except Exception as error:  # the model timed out, or a bug: each job retries alone
            for claim in claims.values():
                self._transient(claim, error, later)
            return
        analysed_at = time.monotonic()
        outcomes: list[JobOutcome] = []
        for analysed in found.outcomes:
            claim = claims[analysed.listing_id]
            status = "succeeded" if analysed.result.status == "ok" else "failed"
            listing = replace(analysed, job_id=claim.job_id)
            outcomes.append(JobOutcome(claim.job_id, claim.attempt, status, listing, len(claims)))
        wait = min(WRITE_TIMEOUT, max(1.0, claimed_at + runner.time_limit - time.monotonic()))
        written = runner.writer.write_many(outcomes, timeout=wait) if outcomes else []
        seconds = {
            "claim": claim_seconds,
            "analysis": analysed_at - claimed_at,
            "write": time.monotonic() - analysed_at,
        }
        for job, answer in zip(outcomes, written, strict=True):
            claim = claims[job.listing.listing_id]
            if isinstance(answer, Exception):
                self._transient(claim, answer, later)
            elif answer:
                summary[job.job_status] += 1
                runner.finished(claim, job.job_status, seconds, len(claims))
        for listing_id, why in found.transient.items():
            self._transient(claims[listing_id], TransientError(why), later)

    def _transient(
        self, claim: ClaimedJob, error: Exception, later: dict[uuid.UUID, float | None]
    ) -> None:
        """A job this group could not finish: retried as a single job (or recorded dead)."""
        report = self.runner.after_transient(claim, error)
        if report.retry_in is not None:
            later[claim.job_id] = min(report.retry_in, self.runner.retry_ceiling)

    def _send_back(self, later: dict[uuid.UUID, float | None]) -> None:
        """Publish the jobs this group hands on, then record them as sent. A publish that
        fails leaves them unsent for the reconciler (they are `queued` or `running`)."""
        by_delay: dict[float | None, list[uuid.UUID]] = {}
        for job_id, countdown in later.items():
            by_delay.setdefault(countdown, []).append(job_id)
        for countdown, job_ids in by_delay.items():
            try:
                self.resend(job_ids, countdown)
            except Exception as error:
                log.warning("could not send %d jobs back: %s", len(job_ids), one_line(error))
                with self.runner.sessions.begin() as session:
                    jobs.unmark_sent(session, job_ids)
                continue
            with self.runner.sessions.begin() as session:
                jobs.mark_sent(session, job_ids)
