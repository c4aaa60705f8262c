"""The `jobs` table: created by the producer, claimed, finished and reconciled by workers."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.listings import get_listing
from db.records import ListingRecord
from db.schema import Job

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class NewJob:
    """A job to create and send: which listing, which model, which bulk run (if any)."""

    job_id: uuid.UUID
    listing_id: str
    model_id: str
    run_id: uuid.UUID | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker may run now: its attempt number (the fencing token) and the listing."""

    job_id: uuid.UUID
    model_id: str
    attempt: int
    listing: ListingRecord


@dataclass(frozen=True)
class Unclaimable:
    """Why a delivered job is not run: `finished` (a duplicate delivery), `missing`,
    or `exhausted` (its attempts are used up; the caller records it as dead)."""

    reason: str
    listing_id: str | None = None
    model_id: str | None = None
    last_error: str | None = None
    attempts: int = 0


def create_jobs(session: Session, jobs: Sequence[NewJob]) -> None:
    """Insert queued jobs (sent to the broker only after this transaction commits)."""
    session.add_all(
        Job(job_id=j.job_id, listing_id=j.listing_id, model_id=j.model_id, run_id=j.run_id)
        for j in jobs
    )


def mark_sent(session: Session, job_ids: Iterable[uuid.UUID]) -> None:
    """Remember that the broker has these jobs, so the reconciler leaves them alone.

    Rows are locked in job_id order, the order every multi-job writer uses (workers finish
    their jobs in groups while the producer is still marking them sent): no deadlock.
    """
    ids = sorted(set(job_ids))
    if not ids:
        return
    locked = (
        select(Job.job_id).where(Job.job_id.in_(ids)).order_by(Job.job_id).with_for_update()
    ).cte("locked")
    session.execute(
        update(Job)
        .where(Job.job_id.in_(select(locked.c.job_id)))
        .values(sent_at=func.now(), updated_at=func.now())
    )


def claim(
    session: Session, job_id: uuid.UUID, *, worker: str, max_attempts: int
) -> ClaimedJob | Unclaimable:
    """Start an attempt: counts it before any work, so a job that kills its worker every time
    still reaches its cap and ends `dead` instead of looping forever."""
    claimed = session.execute(
        update(Job)
        .where(Job.job_id == job_id, Job.status.in_(ACTIVE), Job.attempts < max_attempts)
        .values(
            status="running",
            attempts=Job.attempts + 1,
            started_at=func.now(),
            updated_at=func.now(),
            worker=worker,
        )
        .returning(Job.listing_id, Job.model_id, Job.attempts)
    ).first()
    if claimed is None:
        return _why_unclaimable(session, job_id)
    listing_id, model_id, attempt = claimed
    listing = get_listing(session, listing_id)
    if listing is None:
        return Unclaimable("missing", listing_id, model_id)
    return ClaimedJob(job_id, model_id, attempt, listing)


def _why_unclaimable(session: Session, job_id: uuid.UUID) -> Unclaimable:
    row = session.execute(
        select(Job.status, Job.listing_id, Job.model_id, Job.error, Job.attempts).where(
            Job.job_id == job_id
        )
    ).first()
    if row is None:
        return Unclaimable("missing")
    status, listing_id, model_id, error, attempts = row
    reason = "exhausted" if status in ACTIVE else "finished"
    return Unclaimable(reason, listing_id, model_id, error, attempts)


def finish(
    session: Session,
    job_id: uuid.UUID,
    *,
    attempt: int,
    status: str,
    error: str | None,
    batch_size: int | None,
) -> bool:
    """Set the job's final state if `attempt` still holds it; False means another attempt (or
    an earlier finish) owns the job and this attempt must write nothing."""
    finished = session.execute(
        update(Job)
        .where(Job.job_id == job_id, Job.status.in_(ACTIVE), Job.attempts == attempt)
        .values(
            status=status,
            error=error,
            batch_size=batch_size,
            finished_at=func.now(),
            updated_at=func.now(),
        )
        .returning(Job.job_id)
    ).first()
    return finished is not None


def note_retry(session: Session, job_id: uuid.UUID, attempt: int, error: str) -> None:
    """A transient failure: back to queued, the error kept, and not yet known to be in the
    broker (`sent_at` NULL) until the retry message is published."""
    session.execute(
        update(Job)
        .where(Job.job_id == job_id, Job.attempts == attempt)
        .values(status="queued", error=error, sent_at=None, updated_at=func.now())
    )


def jobs_to_resend(
    session: Session, model_id: str, *, unsent_for: timedelta, stuck_for: timedelta, limit: int
) -> list[uuid.UUID]:
    """Jobs no broker message will bring back: never sent (or a failed retry publish) for
    `unsent_for`, or `running` for longer than any delivery could take (`stuck_for`, well past
    the visibility timeout, after which the broker itself would have redelivered). Locked rows
    are skipped, so two reconcilers never take the same job."""
    rows = session.scalars(
        select(Job.job_id)
        .where(Job.model_id == model_id)
        .where(
            or_(
                (Job.status == "queued")
                & Job.sent_at.is_(None)
                & (Job.updated_at < func.now() - unsent_for),
                (Job.status == "running") & (Job.updated_at < func.now() - stuck_for),
            )
        )
        .order_by(Job.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return list(rows)


def status_counts(session: Session, job_ids: Sequence[uuid.UUID]) -> Counter[str]:
    """How many of these jobs are in each state."""
    counts: Counter[str] = Counter()
    for chunk_start in range(0, len(job_ids), 5000):
        chunk = job_ids[chunk_start : chunk_start + 5000]
        rows = session.execute(
            select(Job.status, func.count()).where(Job.job_id.in_(chunk)).group_by(Job.status)
        ).all()
        for status, count in rows:
            counts[status] += count
    return counts
