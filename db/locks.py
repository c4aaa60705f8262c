"""Advisory locks: one holder at a time for work that is not about rows (an index build, a
reconciler pass). Transaction-scoped where the work fits in a transaction, so a crashed holder
can never keep one; else held by a connection of its own, released when it closes."""

from __future__ import annotations

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session


def transaction_lock(session: Session, key: str) -> None:
    """Wait for the lock named `key`; it is released when the transaction ends."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


def try_transaction_lock(session: Session, key: str) -> bool:
    """Take the lock named `key` if nobody holds it; False at once otherwise."""
    taken = session.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"), {"key": key})
    return bool(taken)


def try_session_lock(connection: Connection, key: str) -> bool:
    """Take the lock named `key` for the life of `connection` if nobody holds it (the same
    locks as the transaction-scoped ones); for work that cannot run in a transaction, such as
    CREATE INDEX CONCURRENTLY. Closing the connection releases it."""
    taken = connection.scalar(text("SELECT pg_try_advisory_lock(hashtext(:key))"), {"key": key})
    return bool(taken)
