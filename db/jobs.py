"""The `jobs` table: created by the producer, claimed, finished and reconciled by workers."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, any_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.types import Integer, Text

from db.arrays import any_uuids
from db.listings import listing_columns, listing_record
from db.records import ListingRecord
from db.schema import Job, Listing, table_of

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
    # Seconds from the job's creation to this claim, first attempts only (a retry's wait is
    # its backoff): the queue wait. From `created_at`, not `sent_at`: the producer marks a job
    # sent after publishing it, so a prompt claim can come first.
    waited: float | None = None


@dataclass(frozen=True)
class Unclaimable:
    """Why a delivered job is not run: `finished` (a duplicate delivery), `duplicate` (delivered
    twice at once: the other delivery runs it), `interrupted` (an attempt started and never
    finished: its worker may have died of this very job, so the caller claims it again on its
    own, see `claim_many`), `running` (its last attempt is live elsewhere: the delivery is kept,
    retried once that attempt would have ended), `unknown` (asked again later), `missing`, or
    `exhausted` (its attempts are used up and none is live; the caller records it as dead)."""

    reason: str
    listing_id: str | None = None
    model_id: str | None = None
    last_error: str | None = None
    attempts: int = 0
    live_for_more: float = 0.0  # `running`: seconds until its live attempt counts as dead


def create_jobs(session: Session, jobs: Sequence[NewJob]) -> None:
    """Insert queued jobs (sent to the broker only after this transaction commits). One Core
    statement, not ORM objects: the unit of work's flush took 0.15 ms a job, most of an
    `enqueue` call's own CPU."""
    if not jobs:
        return
    session.execute(
        insert(table_of(Job)),
        [
            {
                "job_id": j.job_id,
                "listing_id": j.listing_id,
                "model_id": j.model_id,
                "run_id": j.run_id,
            }
            for j in jobs
        ],
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
        select(Job.job_id)
        .where(Job.job_id == any_uuids(ids))
        .order_by(Job.job_id)
        .with_for_update()
    ).cte("locked")
    session.execute(
        update(Job)
        .where(Job.job_id.in_(select(locked.c.job_id)))
        .values(sent_at=func.now(), updated_at=func.now())
    )


def unmark_sent(session: Session, job_ids: Iterable[uuid.UUID]) -> None:
    """A publish that failed after `mark_sent` committed: the queued ones among these jobs
    are unsent again, for the reconciler's next look (locked in job_id order, as always)."""
    ids = sorted(set(job_ids))
    if not ids:
        return
    locked = (
        select(Job.job_id)
        .where(Job.job_id == any_uuids(ids), Job.status == "queued")
        .order_by(Job.job_id)
        .with_for_update()
    ).cte("locked")
    session.execute(update(Job).where(Job.job_id.in_(select(locked.c.job_id))).values(sent_at=None))


def claim(
    session: Session,
    job_id: uuid.UUID,
    *,
    worker: str,
    max_attempts: int,
    live_for: timedelta = timedelta(0),
    interrupted: bool = True,
) -> ClaimedJob | Unclaimable:
    """Start an attempt of one job, by default even one whose last attempt never finished
    (see `claim_many`)."""
    return claim_many(
        session,
        [job_id],
        worker=worker,
        max_attempts=max_attempts,
        live_for=live_for,
        interrupted=interrupted,
    )[job_id]


def _claim_statement(interrupted: bool) -> Select[Any]:
    """Built once (building a statement costs more Python than running it): lock the
    claimable rows in job_id order, count the attempts, and read the listings, in one round
    trip. Parameters: `ids` (uuid[]), `max_attempts`, `worker`. `interrupted`: `running` jobs
    are claimable too, not only `queued` ones."""
    jobs_table, listing = table_of(Job), table_of(Listing)
    ids = bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))
    cap = bindparam("max_attempts", type_=Integer)
    status = jobs_table.c.status
    claimable = (
        jobs_table.c.job_id == any_(ids),
        status.in_(ACTIVE) if interrupted else status == "queued",
        jobs_table.c.attempts < cap,
    )
    locked = (
        select(jobs_table.c.job_id)
        .where(*claimable)
        .order_by(jobs_table.c.job_id)
        .with_for_update()
        .cte("locked")
    )
    claimed = (
        update(jobs_table)
        .where(jobs_table.c.job_id.in_(select(locked.c.job_id)), *claimable)
        .values(
            status="running",
            attempts=jobs_table.c.attempts + 1,
            started_at=func.now(),
            updated_at=func.now(),
            worker=bindparam("worker", type_=Text),
        )
        .returning(
            jobs_table.c.job_id,
            jobs_table.c.listing_id,
            jobs_table.c.model_id,
            jobs_table.c.attempts,
            func.extract("epoch", func.now() - jobs_table.c.created_at).label("waited"),
        )
        .cte("claimed")
    )
    return select(claimed, *listing_columns(listing)).join_from(
        claimed, listing, listing.c.listing_id == claimed.c.listing_id, isouter=True
    )


_CLAIM = _claim_statement(interrupted=False)
_CLAIM_INTERRUPTED = _claim_statement(interrupted=True)


def claim_many(
    session: Session,
    job_ids: Sequence[uuid.UUID],
    *,
    worker: str,
    max_attempts: int,
    live_for: timedelta = timedelta(0),
    interrupted: bool = False,
) -> dict[uuid.UUID, ClaimedJob | Unclaimable]:
    """Start an attempt of each job, in one statement whatever their number (a worker claims
    the deliveries that arrive together at once). Each attempt is counted before any work, so
    a job that kills its worker every time still reaches its cap and ends `dead` instead of
    looping forever.

    Only `queued` jobs are claimed unless `interrupted`: a job still `running` had an attempt
    that never finished (its worker died, perhaps of this very job, or it is a duplicate
    delivery of a live one) and is answered `interrupted`, for the caller to claim on its own
    (`interrupted=True`) when nothing else of its kind runs. Claimed together with fresh jobs,
    a job that kills its worker would use up an attempt of every job in flight with it, every
    time, until they all ended `dead` with it.

    Jobs not claimed are explained by a second query: a job whose attempts are used up is
    `exhausted` only once its last attempt has been running for `live_for` (the longest an
    attempt may take); before that it is `running`, a live attempt that a duplicate delivery
    must leave alone."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    statement = _CLAIM_INTERRUPTED if interrupted else _CLAIM
    rows = session.execute(statement, {"ids": ids, "max_attempts": max_attempts, "worker": worker})
    outcome: dict[uuid.UUID, ClaimedJob | Unclaimable] = {}
    for row in rows:
        record = listing_record(row)
        outcome[row.job_id] = (
            Unclaimable("missing", row.listing_id, row.model_id)
            if record is None
            else ClaimedJob(
                row.job_id,
                row.model_id,
                row.attempts,
                record,
                max(0.0, float(row.waited)) if row.attempts == 1 else None,
            )
        )
    unclaimed = [i for i in ids if i not in outcome]
    try:
        outcome.update(_why_unclaimable(session, unclaimed, live_for, max_attempts))
    except SQLAlchemyError:
        # The claims above are committed (autocommit) and must reach their jobs; the others
        # are asked again later.
        outcome.update(dict.fromkeys(unclaimed, Unclaimable("unknown")))
    return outcome


def _why_unclaimable(
    session: Session, job_ids: Sequence[uuid.UUID], live_for: timedelta, max_attempts: int
) -> dict[uuid.UUID, Unclaimable]:
    """Liveness is measured from `started_at`, which only a claim sets (a re-send's `sent_at`
    and `updated_at` must not make a dead attempt look alive)."""
    if not job_ids:
        return {}
    live_left = func.extract("epoch", Job.started_at + live_for - func.now())
    rows = session.execute(
        select(
            Job.job_id,
            Job.status,
            Job.listing_id,
            Job.model_id,
            Job.error,
            Job.attempts,
            live_left,
        ).where(Job.job_id == any_uuids(job_ids))
    ).all()
    why: dict[uuid.UUID, Unclaimable] = dict.fromkeys(job_ids, Unclaimable("missing"))
    for job_id, status, listing_id, model_id, error, attempts, left in rows:
        if status not in ACTIVE:
            why[job_id] = Unclaimable("finished", listing_id, model_id, error, attempts)
        elif status == "running" and attempts < max_attempts:
            why[job_id] = Unclaimable("interrupted", listing_id, model_id, error, attempts)
        elif status == "running" and left is not None and left > 0:
            why[job_id] = Unclaimable(
                "running", listing_id, model_id, error, attempts, live_for_more=float(left)
            )
        else:
            why[job_id] = Unclaimable("exhausted", listing_id, model_id, error, attempts)
    return why


def active_attempt(session: Session, job_id: uuid.UUID) -> tuple[str, int] | None:
    """(listing_id, attempts) of a job still queued or running, else None."""
    row = session.execute(
        select(Job.listing_id, Job.attempts).where(Job.job_id == job_id, Job.status.in_(ACTIVE))
    ).first()
    return None if row is None else (row[0], row[1])


@dataclass(frozen=True)
class Finish:
    """A job's final state, to be set if `attempt` still holds it."""

    job_id: uuid.UUID
    attempt: int
    status: str
    error: str | None
    batch_size: int | None


_FINISH = text(
    """
    WITH input AS (
        SELECT * FROM unnest(:ids, :attempts, :statuses, :errors, :batch_sizes)
            AS t(job_id, attempt, status, error, batch_size)
    ), locked AS (
        SELECT j.job_id FROM jobs j JOIN input i ON i.job_id = j.job_id
        WHERE j.status IN ('queued', 'running') AND j.attempts = i.attempt
        ORDER BY j.job_id FOR UPDATE OF j
    )
    UPDATE jobs j SET status = i.status, error = i.error, batch_size = i.batch_size,
        finished_at = now(), updated_at = now()
    FROM input i
    WHERE j.job_id = i.job_id AND j.job_id IN (SELECT job_id FROM locked)
        AND j.status IN ('queued', 'running') AND j.attempts = i.attempt
    RETURNING j.job_id, i.attempt
    """
).bindparams(
    bindparam("ids", type_=ARRAY(UUID(as_uuid=True))),
    bindparam("attempts", type_=ARRAY(Integer)),
    bindparam("statuses", type_=ARRAY(Text)),
    bindparam("errors", type_=ARRAY(Text)),
    bindparam("batch_sizes", type_=ARRAY(Integer)),
)


def finish_many(session: Session, finishes: Sequence[Finish]) -> set[tuple[uuid.UUID, int]]:
    """Set each job's final state in one statement; returns the (job, attempt) pairs that still
    held their job. An attempt missing from the answer lost it to another attempt (or the job
    was finished already): it must write nothing."""
    if not finishes:
        return set()
    rows = session.execute(
        _FINISH,
        {
            "ids": [f.job_id for f in finishes],
            "attempts": [f.attempt for f in finishes],
            "statuses": [f.status for f in finishes],
            "errors": [f.error for f in finishes],
            "batch_sizes": [f.batch_size for f in finishes],
        },
    ).all()
    return {(job_id, attempt) for job_id, attempt in rows}


def note_retry(session: Session, job_id: uuid.UUID, attempt: int, error: str) -> bool:
    """A transient failure: back to queued, the error kept, and not yet known to be in the
    broker (`sent_at` NULL) until the retry message is published. False when `attempt` no
    longer holds the job (a later attempt does, or it ended): nothing to retry."""
    noted = session.execute(
        update(Job)
        .where(Job.job_id == job_id, Job.attempts == attempt, Job.status.in_(ACTIVE))
        .values(status="queued", error=error, sent_at=None, updated_at=func.now())
        .returning(Job.job_id)
    ).first()
    return noted is not None


def jobs_to_resend(
    session: Session, model_id: str, *, unsent_for: timedelta, stuck_for: timedelta, limit: int
) -> list[uuid.UUID]:
    """Jobs no broker message will bring back: never sent (or a failed retry publish) for
    `unsent_for`; sent `stuck_for` ago and still never claimed; or `running` for longer than
    any delivery could take (`stuck_for`, well past the visibility timeout, after which the
    broker itself would have redelivered). Locked rows are skipped, so two reconcilers never
    take the same job."""
    rows = session.scalars(
        select(Job.job_id)
        .where(Job.model_id == model_id)
        .where(
            or_(
                (Job.status == "queued")
                & Job.sent_at.is_(None)
                & (Job.updated_at < func.now() - unsent_for),
                # Sent, but no delivery ever claimed it: the broker lost the message (restarted
                # without persistence, a failover, the AOF `everysec` window). A duplicate of a
                # message merely waiting in a long backlog is harmless: claims are fenced.
                (Job.status == "queued") & (Job.sent_at < func.now() - stuck_for),
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
    if not job_ids:
        return counts
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.job_id == any_uuids(job_ids))
        .group_by(Job.status)
    ).all()
    for status, count in rows:
        counts[status] += count
    return counts
