"""Advisory locks: one holder at a time for work that is not about rows (an index build, a
reconciler pass). Transaction-scoped, so a crashed holder can never keep one."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def transaction_lock(session: Session, key: str) -> None:
    """Wait for the lock named `key`; it is released when the transaction ends."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


def try_transaction_lock(session: Session, key: str) -> bool:
    """Take the lock named `key` if nobody holds it; False at once otherwise."""
    taken = session.scalar(text("SELECT pg_try_advisory_xact_lock(hashtext(:key))"), {"key": key})
    return bool(taken)
