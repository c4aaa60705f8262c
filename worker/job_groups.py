"""Jobs run in groups: the deliveries that arrive together, claimed, analysed and committed as one.

Every delivery (a single-job message, or a group message: one `enqueue` call's events,
LV_ENQUEUE_GROUP at a time) hands its job ids to a shared queue; a few group threads each take
what is waiting (up to a group's size) and run it: one claim statement, one fetch-decode-embed
pass over all their images and texts (the run chunks' analyzer: one request to the model), one
commit. The per-job costs of the old path (thread hand-offs at the claim, the cache lookup, the
batcher and the writer, each a GIL round trip) are paid once per group: on two CPU cores a
worker's CPU per listing halved. Each job keeps its own attempt, outcome, log line and metrics.

What a group cannot finish follows the single-job rules (`worker.job_runner`):
- a job whose earlier attempt never finished (`interrupted`: perhaps it killed its worker) is
  claimed and run alone, one such job at a time, so a poison listing takes no group with it;
- a transient failure is retried after its backoff, or recorded `dead` at the cap;
- a job whose attempt is live elsewhere is looked at again once that attempt must have ended.
A single-job delivery does that through its own message (a Celery retry); a group message
sends such jobs on as single-job messages.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from contract.errors import TransientError, one_line
from db import jobs
from db.jobs import ClaimedJob
from db.records import JobOutcome
from worker.chunk_analysis import ChunkAnalysis, ChunkAnalyzer
from worker.inference import Ticket
from worker.job_runner import WRITE_TIMEOUT, JobReport, JobRunner, summary_of
from worker.retries import backoff_seconds

log = logging.getLogger(__name__)
_FAILURES_SHOWN = 5  # failed listings named in a group message's summary (Flower shows it)
_WAIT = 3600.0  # seconds a delivery waits for its group; each step has its own shorter limit

# Publish jobs again as single-job messages, after `countdown` seconds (None: now).
ResendJobs = Callable[[Sequence[uuid.UUID], float | None], None]


class Alone:
    """A job to claim and run on its own (`interrupted`, or a second job of one listing)."""


ALONE = Alone()
Decision = JobReport | Alone


@dataclass(frozen=True)
class GroupReport:
    """What a group message's task hands back to Celery: counts (Flower shows them) or, when
    nothing of it could be done, a retry of the whole message."""

    summary: dict[str, Any] = field(default_factory=dict)
    retry_in: float | None = None


class JobGroups:
    """The shared queue and its group threads; `run_one` and `run_message` block until their
    jobs are decided. `threads` groups run at once: enough to decode the next batch while one
    is on the model, and a bound on the pixels held."""

    def __init__(
        self,
        runner: JobRunner,
        analyzer: ChunkAnalyzer,
        resend: ResendJobs,
        *,
        max_group: int,
        threads: int,
    ) -> None:
        self.runner = runner
        self.analyzer = analyzer
        self.resend = resend
        self.max_group = max_group
        # One entry per delivery: its jobs stay together in one group.
        self._waiting: queue.SimpleQueue[list[tuple[uuid.UUID, Future[Decision]]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._loop, name=f"job-group-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the groups running, then fail what still waits (its deliveries retry)."""
        for _ in self._threads:
            self._waiting.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                delivery = self._waiting.get_nowait()
            except queue.Empty:
                return
            for _, future in delivery or []:
                if future.set_running_or_notify_cancel():
                    future.set_exception(TransientError("the worker is stopping"))

    # -- deliveries -----------------------------------------------------------------------

    def run_one(self, job_id: uuid.UUID, redeliveries: int = 0) -> JobReport:
        """One single-job delivery: run with whatever else is waiting; alone if it must be."""
        try:
            decision = self._decide([job_id])[job_id]
        except (SQLAlchemyError, FutureTimeout) as error:
            log.warning("job %s: database trouble, will retry: %s", job_id, one_line(error))
            return self._retry(redeliveries)
        except Exception:
            log.exception("job %s: unexpected error outside the analysis, will retry", job_id)
            return self._retry(redeliveries)
        if isinstance(decision, Alone):
            return self.runner.run(job_id, redeliveries)
        return self._capped(decision)

    def run_message(self, job_ids: Sequence[uuid.UUID], redeliveries: int = 0) -> GroupReport:
        """One group message's delivery: its jobs decided; what is left sent on alone."""
        try:
            decisions = self._decide(job_ids)
        except (SQLAlchemyError, FutureTimeout) as error:
            log.warning("group of %d jobs: database trouble, will retry: %s", len(job_ids), error)
            return GroupReport(retry_in=self._retry(redeliveries).retry_in)
        except Exception:
            log.exception("group of %d jobs: unexpected error, will retry", len(job_ids))
            return GroupReport(retry_in=self._retry(redeliveries).retry_in)
        summary: dict[str, Any] = {"jobs": len(job_ids), "succeeded": 0, "failed": 0}
        errors: dict[str, str] = {}
        later: dict[uuid.UUID, float | None] = {}
        for job_id, decision in decisions.items():
            if isinstance(decision, Alone):
                later[job_id] = None
            elif decision.retry_in is not None:
                later[job_id] = self._capped(decision).retry_in
            elif decision.summary.get("status") == "ok":
                summary["succeeded"] += 1
            elif decision.summary.get("status") == "failed":
                summary["failed"] += 1
                if len(errors) < _FAILURES_SHOWN:
                    errors[decision.summary["listing_id"]] = decision.summary.get("error", "")
        if not self._send_on(later):
            # Its finished jobs are skipped when it comes back; the rest are sent on again.
            return GroupReport(retry_in=self._retry(redeliveries).retry_in)
        summary["sent_on"] = len(later)
        if errors:
            summary["errors"] = errors
        return GroupReport(summary)

    def _capped(self, report: JobReport) -> JobReport:
        """A retry waits at most the runner's ceiling (see `worker.runtime.retry_ceiling`)."""
        ceiling = self.runner.retry_ceiling
        if report.retry_in is not None and report.retry_in > ceiling:
            return JobReport(report.summary, ceiling)
        return report

    def _retry(self, redeliveries: int) -> JobReport:
        delay = backoff_seconds(redeliveries + 2, self.runner.retry_backoff)
        return JobReport(retry_in=min(delay, self.runner.retry_ceiling))

    def _decide(self, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Decision]:
        delivery: list[tuple[uuid.UUID, Future[Decision]]] = [(j, Future()) for j in job_ids]
        self._waiting.put(delivery)
        return {job_id: future.result(timeout=_WAIT) for job_id, future in delivery}

    def _send_on(self, later: dict[uuid.UUID, float | None]) -> bool:
        """Publish the jobs a group message hands on, then record them as sent (best effort:
        the reconciler may send one again, which is harmless). False when a publish failed."""
        by_delay: dict[float | None, list[uuid.UUID]] = {}
        for job_id, countdown in later.items():
            by_delay.setdefault(countdown, []).append(job_id)
        for countdown, job_ids in by_delay.items():
            try:
                self.resend(job_ids, countdown)
            except Exception as error:
                log.warning("could not send %d jobs on: %s", len(job_ids), one_line(error))
                return False
            try:
                with self.runner.sessions.begin() as session:
                    jobs.mark_sent(session, job_ids)
            except SQLAlchemyError as error:
                log.warning("could not record %d jobs as sent: %s", len(job_ids), one_line(error))
        return True

    # -- the group threads ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            group = list(first)
            while len(group) < self.max_group:
                try:
                    more = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # closing: finish this group first
                    self._waiting.put(None)
                    break
                group.extend(more)
            running = [(j, f) for j, f in group if f.set_running_or_notify_cancel()]
            if not running:
                continue
            try:
                decided = self.run_group([job_id for job_id, _ in running])
            except BaseException as error:  # the whole group's trouble: each delivery's
                for _, future in running:
                    future.set_exception(error)
                continue
            for job_id, future in running:
                future.set_result(decided[job_id])

    def run_group(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Decision]:
        """Claim, analyse and commit `job_ids` together; each job's decision. Two jobs of one
        listing run one after the other, each on its own claim (a listing is analysed once
        per round)."""
        runner = self.runner
        # A job another thread here claims or runs (a second delivery of it) is left to the
        # single-job path, which waits for that attempt instead of taking the job from it.
        held = runner.live.try_hold(job_ids)
        decided: dict[uuid.UUID, Decision] = {j: ALONE for j in job_ids if j not in held}
        try:
            decided |= self._claim_and_analyse([j for j in job_ids if j in held])
        finally:
            runner.live.release(held)
        return decided

    def _claim_and_analyse(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Decision]:
        if not job_ids:
            return {}
        runner = self.runner
        decided: dict[uuid.UUID, Decision] = {}
        with runner.analyzer.service.coming() as ticket:
            started = time.monotonic()
            answers = runner.queries.claim_now(job_ids)
            claim_seconds = time.monotonic() - started
            rounds: list[dict[str, ClaimedJob]] = []
            for job_id in dict.fromkeys(job_ids):  # a job delivered twice: decided once
                answer = answers[job_id]
                if isinstance(answer, ClaimedJob):
                    listing_id = answer.listing.listing_id
                    free = next((r for r in rounds if listing_id not in r), None)
                    if free is None:
                        free = {}
                        rounds.append(free)
                    free[listing_id] = answer
                elif answer.reason == "interrupted":
                    decided[job_id] = ALONE
                else:
                    decided[job_id] = self._guarded(job_id, runner.unclaimable, job_id, answer)
            for number, claims in enumerate(rounds):
                decided |= self._analyse(claims, claim_seconds, ticket if number == 0 else None)
        return decided

    def _guarded(self, job_id: uuid.UUID, step: Callable[..., JobReport], *args: Any) -> JobReport:
        """One job's own database step (a dead record, a retry note): its failure is that
        job's retry, never the whole group's."""
        try:
            return step(*args)
        except Exception as error:
            log.warning("job %s: could not record its outcome, will retry: %s", job_id, error)
            return self._retry(0)

    def _analyse(
        self, claims: dict[str, ClaimedJob], claim_seconds: float, ticket: Ticket | None
    ) -> dict[uuid.UUID, Decision]:
        runner = self.runner
        claimed_at = time.monotonic()
        listings = [claim.listing for claim in claims.values()]
        try:
            found = self.analyzer.analyze_new(listings, claimed_at + runner.time_limit, ticket)
        except Exception as error:  # the model timed out, or a bug: each job's own retry
            return {c.job_id: self._transient(c, error) for c in claims.values()}
        analysed_at = time.monotonic()
        outcomes: list[JobOutcome] = []
        for analysed in found.outcomes:
            claim = claims[analysed.listing_id]
            status = "succeeded" if analysed.result.status == "ok" else "failed"
            listing = replace(analysed, job_id=claim.job_id)
            units = found.batch_units.get(analysed.listing_id)
            outcomes.append(JobOutcome(claim.job_id, claim.attempt, status, listing, units))
        wait = min(WRITE_TIMEOUT, max(1.0, claimed_at + runner.time_limit - time.monotonic()))
        written = runner.writer.write_many(outcomes, timeout=wait) if outcomes else []
        seconds = {
            "claim": claim_seconds,
            "analysis": analysed_at - claimed_at,
            "write": time.monotonic() - analysed_at,
        }
        decided: dict[uuid.UUID, Decision] = {}
        for job, answer in zip(outcomes, written, strict=True):
            claim = claims[job.listing.listing_id]
            if isinstance(answer, Exception):
                decided[claim.job_id] = self._transient(claim, answer)
            elif not answer:  # a later attempt holds the job: this one reports nothing
                decided[claim.job_id] = JobReport({"skipped": "superseded"})
            else:
                stages = _stages(job, found)
                runner.finished(claim, job.job_status, seconds, job.batch_size, stages)
                decided[claim.job_id] = JobReport(
                    summary_of(claim.listing.listing_id, job.listing.result)
                )
        for listing_id, why in found.transient.items():
            claim = claims[listing_id]
            decided[claim.job_id] = self._transient(claim, TransientError(why))
        return decided

    def _transient(self, claim: ClaimedJob, error: Exception) -> JobReport:
        return self._guarded(claim.job_id, self.runner.after_transient, claim, error)


def _stages(job: JobOutcome, found: ChunkAnalysis) -> dict[str, float]:
    """The group's stage times, as this job's: no model stage for a listing none of whose
    images could be used (as for a single job, which never reaches the model then)."""
    result = job.listing.result
    if result.images_failed == result.images_total:
        return {stage: spent for stage, spent in found.seconds.items() if stage != "infer"}
    return found.seconds
