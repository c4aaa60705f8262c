"""The restamp after a switch of the active model, in batches after the switch's commit.

A poller of `listing_results` remembers the last change_seq it saw; at a switch, the rows of the
new model carry the values they were written with, mostly below that. So each of them gets a
new value (the change_seq trigger hands one out on any update), and the poller reads the switch
as new rows. In one transaction that took about 20 µs a row with every result writer waiting
(20 s for a million listings; a writer waiting past its lock limit failed its attempt). Now the
switch only records where the restamp must go (`mark_for_restamp`: the last value handed out
before it, read with the change_seq lock held, so no writer is in flight) and the rows get their
new values `BATCH_ROWS` at a time, each batch a transaction of its own (`restamp_pending`):
writers wait at most one batch. Until it finishes, the view already shows the new model's rows
and the poller receives them batch by batch, oldest first: its own copy of the catalogue mixes
the two models for that long (about 20 s a million listings here). A row a live writer updates
meanwhile gets its new value from that write and leaves the range. Progress is on `active_model`, so
whoever comes next (the completing worker, the producer of a rollback, beat's watch every
minute, after a crash) goes on from the last batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from db.engine import make_sessions
from db.schema import ActiveModel

BATCH_ROWS = 20_000  # about 0.4 s a batch here (20 µs a row): how long a writer may wait
CHANGE_SEQ_LOCK = 7526319372016103793  # the key every result write takes (migration 0001)


@dataclass(frozen=True)
class PendingRestamp:
    """The active model's rows still awaiting their new change_seq: those above `after` and at
    or below `through`."""

    model_id: str
    through: int
    after: int
    switched_at: datetime


def mark_for_restamp(session: Session) -> None:
    """In the switch's transaction, after `active_model` names the new model: every row it has
    so far is to be restamped (a switch replaces any restamp still pending: the model it was for
    no longer shows)."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_SEQ_LOCK})
    # last_value even before the first nextval (is_called false, as after a restore's setval):
    # one too high is harmless, 0 would leave every row unrestamped.
    through = session.scalar(text("SELECT last_value FROM listing_results_change_seq"))
    session.execute(update(ActiveModel).values(restamp_through=through, restamped_after=0))


def pending_restamp(session: Session, *, lock: bool = False) -> PendingRestamp | None:
    """The restamp still to do, if any (`lock`: hold the row, so two processes take turns)."""
    query = select(
        ActiveModel.model_id,
        ActiveModel.restamp_through,
        ActiveModel.restamped_after,
        ActiveModel.switched_at,
    )
    row = session.execute(query.with_for_update() if lock else query).first()
    if row is None or row.restamp_through is None:
        return None
    return PendingRestamp(
        row.model_id, row.restamp_through, row.restamped_after or 0, row.switched_at
    )


def restamp_batch(session: Session, rows: int = BATCH_ROWS) -> int | None:
    """Restamp the next `rows` rows of the pending restamp in the caller's transaction; the
    rows taken (0 once none is left: the restamp is then marked done), None if none was
    pending. Takes the change_seq lock first, as every result writer does, so the batch sees
    every committed write and commits in change_seq order. (A row deleted meanwhile counts;
    it needs no new value.)"""
    pending = pending_restamp(session, lock=True)
    if pending is None:
        return None
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHANGE_SEQ_LOCK})
    done = session.execute(
        text(
            "WITH batch AS ("
            " SELECT listing_id, model_id, change_seq FROM results"
            " WHERE model_id = :model_id AND change_seq > :after AND change_seq <= :through"
            " ORDER BY change_seq LIMIT :rows"
            "), restamped AS ("  # PostgreSQL runs it to completion though nothing reads it
            " UPDATE results r SET change_seq = r.change_seq FROM batch b"
            " WHERE r.listing_id = b.listing_id AND r.model_id = b.model_id"
            ") SELECT count(*), max(change_seq) FROM batch"
        ),
        {
            "model_id": pending.model_id,
            "after": pending.after,
            "through": pending.through,
            "rows": rows,
        },
    ).one()
    count, last = int(done[0]), done[1]
    if count == 0:
        session.execute(update(ActiveModel).values(restamp_through=None, restamped_after=None))
    else:
        session.execute(update(ActiveModel).values(restamped_after=last))
    return count


def restamp_pending(engine: Engine, rows: int = BATCH_ROWS, *, seconds: float | None = None) -> int:
    """Go on with the pending restamp, a transaction a batch, to its end or for about
    `seconds`; the rows restamped (0: none pending)."""
    sessions = make_sessions(engine)
    stop = None if seconds is None else time.monotonic() + seconds
    total = 0
    while stop is None or time.monotonic() < stop:
        with sessions.begin() as session:
            done = restamp_batch(session, rows)
        if not done:
            break
        total += done
    return total
