"""The `runs` and `run_chunks` tables: bulk runs over the catalogue and the chunks they queue.

A run's producer records chunks of listing ids (keyset order) and commits before sending them;
workers claim a chunk (its delivery counted first), write what its listings' analyses found and
finish it in one fenced transaction, which also adds to the run's counters. The run completes
when its producer has recorded every chunk and no chunk is open.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Text, cast, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.registered_models import switch_active_model
from db.restamp import mark_for_restamp
from db.schema import Listing, Result, Run, RunChunk

RunKind = Literal["rescore", "reindex"]
RunScope = Literal["all", "stale"]
ACTIVE_RUN = ("pending", "running")
OPEN_CHUNK = ("queued", "running")


def as_kind(kind: str) -> RunKind:
    """A stored kind, checked (the table's CHECK constraint allows no other)."""
    if kind == "rescore":
        return "rescore"
    if kind == "reindex":
        return "reindex"
    raise ValueError(f"unknown run kind {kind!r}")


def as_scope(scope: str) -> RunScope:
    """A stored scope, checked."""
    if scope == "all":
        return "all"
    if scope == "stale":
        return "stale"
    raise ValueError(f"unknown run scope {scope!r}")


class RunConflict(Exception):
    """Another run of the same kind is pending or running; the message names it."""


class RunNotFound(LookupError):
    """No run has the id (or prefix) given."""


@dataclass(frozen=True)
class NewRun:
    """What a run covers: which model, all listings or only stale ones, and how."""

    kind: RunKind
    model_id: str
    scope: RunScope = "all"
    refetch: bool = False
    recompute: bool = False
    chunk_size: int = 64
    previous_model_id: str | None = None


@dataclass(frozen=True)
class NewChunk:
    """Listings to analyse in one message; `generation` is their attempt number."""

    chunk_id: uuid.UUID
    listing_ids: list[str]
    generation: int = 1


@dataclass(frozen=True)
class ClaimedChunk:
    """A chunk a worker may run now: its delivery number fences its write."""

    chunk_id: uuid.UUID
    run_id: uuid.UUID
    kind: RunKind
    model_id: str
    listing_ids: list[str]
    generation: int
    attempt: int
    refetch: bool
    recompute: bool


def create_run(session: Session, new: NewRun) -> uuid.UUID:
    """Record a pending run; `RunConflict` when one of its kind is pending or running."""
    run_id = uuid.uuid4()
    try:
        with session.begin_nested():
            session.execute(
                insert(Run).values(
                    run_id=run_id,
                    kind=new.kind,
                    model_id=new.model_id,
                    status="pending",
                    scope=new.scope,
                    refetch=new.refetch,
                    recompute=new.recompute,
                    chunk_size=new.chunk_size,
                    previous_model_id=new.previous_model_id,
                )
            )
    except IntegrityError:
        raise RunConflict(_conflict_message(session, new.kind)) from None
    return run_id


def _conflict_message(session: Session, kind: str) -> str:
    other = session.scalars(select(Run).where(Run.kind == kind, Run.status.in_(ACTIVE_RUN))).first()
    if other is None:
        return f"another {kind} run has just started"
    return (
        f"a {kind} run is already {other.status}: {other.run_id} (model {other.model_id}, "
        f"{other.done + other.failed} of {other.total} listings); cancel it first "
        f"(listing-vision run {other.run_id} --cancel) or wait for it"
    )


def get_run(session: Session, run_id: uuid.UUID) -> Run | None:
    """The run, or None."""
    return session.get(Run, run_id)


def find_run(session: Session, run_id: str) -> Run:
    """The run a full id or a unique prefix of one names; `LookupError` otherwise."""
    text_id = cast(Run.run_id, Text)
    found = list(session.scalars(select(Run).where(text_id.startswith(run_id.lower())).limit(2)))
    if not found:
        raise RunNotFound(f"no run {run_id!r} (listing-vision runs lists them)")
    if len(found) > 1:
        raise RunNotFound(f"{run_id!r} names more than one run: give more of its id")
    return found[0]


def list_runs(session: Session, limit: int = 20) -> list[Run]:
    """The newest runs first."""
    return list(session.scalars(select(Run).order_by(Run.started_at.desc()).limit(limit)))


def active_runs(session: Session) -> list[Run]:
    """Runs pending or running (for `up`, which starts a worker for each one's model)."""
    return list(session.scalars(select(Run).where(Run.status.in_(ACTIVE_RUN))))


def _in_scope(scope: RunScope, model_id: str) -> ColumnElement[bool] | None:
    """`stale`: no result from the model yet, a failed one, or one older than the listing."""
    if scope == "all":
        return None
    current = select(Result.listing_id).where(
        Result.model_id == model_id,
        Result.listing_id == Listing.listing_id,
        Result.status == "ok",
        Result.listing_updated_at >= Listing.updated_at,
    )
    return ~current.exists()


def count_listings(session: Session, scope: RunScope, model_id: str) -> int:
    """How many listings a run of this scope covers now."""
    query = select(func.count()).select_from(Listing)
    condition = _in_scope(scope, model_id)
    if condition is not None:
        query = query.where(condition)
    return int(session.scalar(query) or 0)


def listing_page(
    session: Session, *, after: str | None, limit: int, scope: RunScope, model_id: str
) -> list[str]:
    """The next `limit` listing ids after `after` (keyset order): memory stays flat."""
    query = select(Listing.listing_id).order_by(Listing.listing_id).limit(limit)
    if after is not None:
        query = query.where(Listing.listing_id > after)
    condition = _in_scope(scope, model_id)
    if condition is not None:
        query = query.where(condition)
    return list(session.scalars(query))


def reindex_target(session: Session) -> str | None:
    """The model a pending or running reindex is embedding the catalogue with, if any."""
    return session.scalar(
        select(Run.model_id).where(Run.kind == "reindex", Run.status.in_(ACTIVE_RUN))
    )


def set_total(session: Session, run_id: uuid.UUID, total: int) -> None:
    """The run's size, as counted when its producer starts (exact once it is produced)."""
    session.execute(update(Run).where(Run.run_id == run_id).values(total=total))


def record_chunks(
    session: Session, run_id: uuid.UUID, chunks: Sequence[NewChunk], cursor: str | None
) -> None:
    """Chunks recorded (to send after commit) and the producer's keyset position with them."""
    if chunks:
        session.execute(
            insert(RunChunk),
            [
                {
                    "chunk_id": c.chunk_id,
                    "run_id": run_id,
                    "listing_ids": c.listing_ids,
                    "generation": c.generation,
                }
                for c in chunks
            ],
        )
    session.execute(
        update(Run)
        .where(Run.run_id == run_id)
        .values(cursor=cursor, status="running", updated_at=func.now())
    )


def finish_production(session: Session, run_id: uuid.UUID) -> None:
    """Every chunk is recorded: the total becomes exact (listings in first-generation chunks)."""
    produced = select(func.coalesce(func.sum(func.cardinality(RunChunk.listing_ids)), 0)).where(
        RunChunk.run_id == run_id, RunChunk.generation == 1, RunChunk.status != "split"
    )
    session.execute(
        update(Run)
        .where(Run.run_id == run_id)
        .values(produced_at=func.now(), total=produced.scalar_subquery(), updated_at=func.now())
    )


def mark_chunks_sent(session: Session, chunk_ids: Sequence[uuid.UUID]) -> None:
    """The broker has these chunks' messages (the reconciler leaves them alone)."""
    if chunk_ids:
        session.execute(
            update(RunChunk)
            .where(RunChunk.chunk_id.in_(sorted(chunk_ids)))
            .values(sent_at=func.now(), updated_at=func.now())
        )


def unmark_chunks_sent(session: Session, chunk_ids: Sequence[uuid.UUID]) -> None:
    """A publish that failed after `mark_chunks_sent` committed: these queued chunks are
    unsent again, for the reconciler's next look."""
    if chunk_ids:
        session.execute(
            update(RunChunk)
            .where(RunChunk.chunk_id.in_(sorted(chunk_ids)), RunChunk.status == "queued")
            .values(sent_at=None)
        )


def claim_chunk(session: Session, chunk_id: uuid.UUID, worker: str) -> ClaimedChunk | str:
    """Start a delivery of a chunk (counted before any work); the reason when it must not run:
    `finished`, `missing`, or `cancelled` (its run was cancelled: the chunk is closed)."""
    row = session.execute(
        update(RunChunk)
        .where(RunChunk.chunk_id == chunk_id, RunChunk.status.in_(OPEN_CHUNK))
        .values(
            status="running",
            attempts=RunChunk.attempts + 1,
            worker=worker,
            started_at=func.now(),
            updated_at=func.now(),
        )
        .returning(RunChunk.run_id, RunChunk.listing_ids, RunChunk.generation, RunChunk.attempts)
    ).first()
    if row is None:
        exists = session.scalar(select(RunChunk.status).where(RunChunk.chunk_id == chunk_id))
        return "missing" if exists is None else "finished"
    run_id, listing_ids, generation, attempt = row
    run = session.get(Run, run_id)
    if run is None or run.status not in ACTIVE_RUN:
        _close_chunk(session, chunk_id, "cancelled")
        return "cancelled"
    return ClaimedChunk(
        chunk_id,
        run_id,
        as_kind(run.kind),
        run.model_id,
        list(listing_ids),
        generation,
        attempt,
        run.refetch,
        run.recompute,
    )


def _close_chunk(session: Session, chunk_id: uuid.UUID, status: str) -> None:
    session.execute(
        update(RunChunk)
        .where(RunChunk.chunk_id == chunk_id)
        .values(status=status, finished_at=func.now(), updated_at=func.now())
    )


def _fenced(claim: ClaimedChunk) -> ColumnElement[bool]:
    return (
        (RunChunk.chunk_id == claim.chunk_id)
        & (RunChunk.status == "running")
        & (RunChunk.attempts == claim.attempt)
    )


def split_chunk(session: Session, claim: ClaimedChunk) -> list[NewChunk]:
    """Replace a redelivered chunk (its worker died) by its two halves, so a listing that kills
    workers ends up alone; empty when another delivery owns the chunk."""
    owned = session.execute(
        update(RunChunk)
        .where(_fenced(claim))
        .values(status="split", finished_at=func.now(), updated_at=func.now())
        .returning(RunChunk.chunk_id)
    ).first()
    if owned is None:
        return []
    middle = len(claim.listing_ids) // 2
    halves = [
        NewChunk(uuid.uuid4(), claim.listing_ids[:middle], claim.generation),
        NewChunk(uuid.uuid4(), claim.listing_ids[middle:], claim.generation),
    ]
    session.execute(
        insert(RunChunk),
        [
            {
                "chunk_id": h.chunk_id,
                "run_id": claim.run_id,
                "listing_ids": h.listing_ids,
                "generation": h.generation,
            }
            for h in halves
        ],
    )
    return halves


def finish_chunk(
    session: Session,
    claim: ClaimedChunk,
    *,
    done: int,
    failed: int,
    retry: NewChunk | None = None,
) -> bool:
    """Close the chunk with its counts, if this delivery still owns it (False: write nothing,
    another delivery does). `retry` holds its listings that failed transiently, as a chunk of
    the next generation (sent after commit)."""
    owned = session.execute(
        update(RunChunk)
        .where(_fenced(claim))
        .values(
            status="succeeded",
            done=done,
            failed=failed,
            finished_at=func.now(),
            updated_at=func.now(),
        )
        .returning(RunChunk.chunk_id)
    ).first()
    if owned is None:
        return False
    if retry is not None:
        session.execute(
            insert(RunChunk).values(
                chunk_id=retry.chunk_id,
                run_id=claim.run_id,
                listing_ids=retry.listing_ids,
                generation=retry.generation,
            )
        )
    return True


def add_progress(session: Session, run_id: uuid.UUID, *, done: int, failed: int) -> None:
    """Add a chunk's listings to the run's counters (last in the chunk's transaction: it locks
    the run's row until commit)."""
    session.execute(
        update(Run)
        .where(Run.run_id == run_id)
        .values(done=Run.done + done, failed=Run.failed + failed, updated_at=func.now())
    )


@dataclass(frozen=True)
class CompletedRun:
    """A run that has just completed, and for a reindex the model it replaced."""

    run_id: uuid.UUID
    kind: RunKind
    model_id: str
    replaced_model_id: str | None = None
    restamped: int = 0


def _done(run_id: Any) -> list[ColumnElement[bool]]:
    """A run is done once it is produced and no chunk of it is open."""
    open_chunks = (
        select(RunChunk.chunk_id)
        .where(RunChunk.run_id == run_id, RunChunk.status.in_(OPEN_CHUNK))
        .exists()
    )
    return [Run.status == "running", Run.produced_at.is_not(None), ~open_chunks]


def done_run(session: Session, run_id: uuid.UUID) -> Run | None:
    """The run, if its work is done but it is not yet marked succeeded."""
    return session.scalar(select(Run).where(Run.run_id == run_id, *_done(run_id)))


def done_runs_left_open(session: Session, stalled_for: timedelta) -> list[Run]:
    """Runs whose work is done but whose completion has not happened for `stalled_for` (the
    process completing it died, or a reindex's index build met passing trouble)."""
    return list(
        session.scalars(
            select(Run).where(*_done(Run.run_id), Run.updated_at < func.now() - stalled_for)
        )
    )


def fail_run(session: Session, run_id: uuid.UUID, error: str) -> None:
    """A running run that cannot complete (its index build failed): `failed`, with why;
    `run --resume` tries again."""
    session.execute(
        update(Run)
        .where(Run.run_id == run_id, Run.status == "running")
        .values(status="failed", error=error, finished_at=func.now(), updated_at=func.now())
    )


def complete_if_done(session: Session, run_id: uuid.UUID) -> CompletedRun | None:
    """Mark the run succeeded once it is produced and no chunk is open; a reindex then switches
    the active model, in this same transaction, and marks its rows for new change_seq values
    (given after the commit, in batches: `db.restamp`)."""
    row = session.execute(
        update(Run)
        .where(Run.run_id == run_id, *_done(run_id))
        .values(status="succeeded", finished_at=func.now(), updated_at=func.now())
        .returning(Run.kind, Run.model_id)
    ).first()
    if row is None:
        return None
    kind, model_id = row
    if kind != "reindex":
        return CompletedRun(run_id, as_kind(kind), model_id)
    replaced = switch_active_model(session, model_id)
    mark_for_restamp(session)
    return CompletedRun(run_id, as_kind(kind), model_id, replaced)


def cancel_run(session: Session, run_id: uuid.UUID) -> Run | None:
    """Stop a pending or running run: queued chunks are closed at once, running ones finish.
    Returns the run (None if there is none)."""
    run = session.get(Run, run_id, with_for_update=True)
    if run is None or run.status not in ACTIVE_RUN:
        return run
    run.status = "cancelled"
    run.finished_at = func.now()
    session.execute(
        update(RunChunk)
        .where(RunChunk.run_id == run_id, RunChunk.status == "queued")
        .values(status="cancelled", finished_at=func.now(), updated_at=func.now())
    )
    return run


def reopen_run(session: Session, run_id: uuid.UUID) -> list[uuid.UUID]:
    """Resume a cancelled, failed or interrupted run: its unfinished chunks are queued again
    (returned, to send after commit); finished listings are not redone. `RunConflict` when
    another run of its kind is active."""
    run = session.get(Run, run_id, with_for_update=True)
    if run is None:
        raise RunNotFound(f"no run {run_id}")
    if run.status == "succeeded":
        return []
    try:
        with session.begin_nested():
            session.execute(
                update(Run)
                .where(Run.run_id == run_id)
                .values(
                    # pending: nothing recorded yet (a produced run of an empty catalogue has
                    # no cursor either, and only a running run completes)
                    status="running" if run.cursor or run.produced_at else "pending",
                    finished_at=None,
                    error=None,
                    updated_at=func.now(),
                )
            )
    except IntegrityError:
        raise RunConflict(_conflict_message(session, run.kind)) from None
    reopened = session.scalars(
        update(RunChunk)
        .where(
            RunChunk.run_id == run_id,
            or_(
                RunChunk.status == "cancelled",
                (RunChunk.status == "queued") & RunChunk.sent_at.is_(None),
            ),
        )
        .values(status="queued", sent_at=None, finished_at=None, updated_at=func.now())
        .returning(RunChunk.chunk_id)
    ).all()
    return list(reopened)


def chunk_counts(session: Session, run_id: uuid.UUID) -> Counter[str]:
    """How many of the run's chunks are in each state."""
    rows = session.execute(
        select(RunChunk.status, func.count())
        .where(RunChunk.run_id == run_id)
        .group_by(RunChunk.status)
    ).all()
    return Counter({status: int(count) for status, count in rows})


def chunks_to_resend(
    session: Session,
    model_id: str,
    *,
    unsent_for: timedelta,
    stuck_for: timedelta,
    stalled_for: timedelta,
    limit: int = 1000,
) -> list[uuid.UUID]:
    """Open chunks of the model's active runs that no message will bring back: never sent for
    `unsent_for`; running for `stuck_for` (past any redelivery); or queued while their run has
    not progressed for `stalled_for` (the message was lost with the broker's data). Locked rows
    are skipped, so two reconcilers never take the same chunk."""
    now = func.now()
    stalled_runs = select(Run.run_id).where(
        Run.model_id == model_id, Run.status == "running", Run.updated_at < now - stalled_for
    )
    active_runs = select(Run.run_id).where(Run.model_id == model_id, Run.status.in_(ACTIVE_RUN))
    rows = session.scalars(
        select(RunChunk.chunk_id)
        .where(RunChunk.run_id.in_(active_runs))
        .where(
            or_(
                (RunChunk.status == "queued")
                & RunChunk.sent_at.is_(None)
                & (RunChunk.updated_at < now - unsent_for),
                (RunChunk.status == "running") & (RunChunk.updated_at < now - stuck_for),
                (RunChunk.status == "queued")
                & RunChunk.run_id.in_(stalled_runs)
                & (RunChunk.updated_at < now - stalled_for),
            )
        )
        .order_by(RunChunk.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return list(rows)


def unproduced_runs(session: Session, stalled_for: timedelta) -> list[Run]:
    """Active runs whose producer stopped before recording every chunk (it died, or was
    interrupted) and that have not progressed for `stalled_for`."""
    return list(
        session.scalars(
            select(Run).where(
                Run.status.in_(ACTIVE_RUN),
                Run.produced_at.is_(None),
                Run.updated_at < func.now() - stalled_for,
            )
        )
    )
