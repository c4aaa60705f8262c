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


def lock_held(connection: Session | Connection, key: str) -> bool:
    """Whether a process holds the lock named `key`, either scope (pg_locks shows its one
    bigint key as two halves: the high one in classid, the low one in objid)."""
    held = connection.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND objid = (hashtext(:key)::bigint & 4294967295)::oid "
            "AND classid = ((hashtext(:key)::bigint >> 32) & 4294967295)::oid)"
        ),
        {"key": key},
    )
    return bool(held)
