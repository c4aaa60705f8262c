"""Engines and sessions; the one place that knows how a database URL becomes a connection."""

from __future__ import annotations

import select
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

# No statement, lock wait or idle transaction may hold a connection (or the change_seq lock)
# for long: a stalled writer turns into an error, which the job retries, not a system-wide stall.
SESSION_LIMITS = (
    "-c statement_timeout=60000 -c lock_timeout=20000 -c idle_in_transaction_session_timeout=60000"
)


def sqlalchemy_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (what pgserver and most tools print)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    pool_timeout: float = 30.0,
    application_name: str = "listing-vision",
    single_statements: bool = False,
) -> Engine:
    """An engine that survives database restarts (pre-ping), bounds every statement and lock
    wait, and names itself in pg_stat_activity. Waiting for a pooled connection is bounded too
    (`pool_timeout`): many task threads share few connections, each briefly.

    `single_statements`: for hot paths whose every use is one self-contained statement (a
    worker's shared claims and cache lookups). Autocommit and no pre-ping: one round trip per
    use instead of five (ping, BEGIN, statement, COMMIT). A connection the server dropped fails
    its statement (the caller retries) and the pool replaces it; one the server ended while it
    sat in the pool (a restart) is replaced before use (`_ended_while_idle`)."""
    engine = create_engine(
        sqlalchemy_url(url),
        pool_pre_ping=not single_statements,
        isolation_level="AUTOCOMMIT" if single_statements else None,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout,
        connect_args={
            "application_name": application_name,
            "connect_timeout": 10,
            "options": SESSION_LIMITS,
            # A silent network loss (a dead NAT entry, a failed-over host) is noticed within
            # about a minute instead of the kernel's two hours: idle probes, and unacknowledged
            # data fails the connection after 60 s.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 60_000,
        },
    )
    # Bulk inserts (a chunk's results, images, embeddings) as multi-row statements of up to
    # 1,000 rows rather than one statement per row: fewer round trips and trigger calls.
    engine.dialect.use_insertmanyvalues_wo_returning = True
    event.listen(engine, "checkout", _replace_if_ended)
    return engine


def _replace_if_ended(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Hand out no pooled connection the server has visibly ended: raising DisconnectionError
    here makes the pool discard it and take another (SQLAlchemy's PoolEvents.checkout)."""
    if _ended_while_idle(dbapi_connection):
        raise DisconnectionError("the server ended this pooled connection while it was idle")


def _ended_while_idle(dbapi_connection: Any) -> bool:
    """Whether an idle connection's socket has something to read. Between statements the server
    sends nothing unasked except its goodbye (a restart's or `pg_terminate_backend`'s FATAL, then
    the close); so this catches every connection a restart ended, without pre-ping's round trip
    (about 0.1 ms per use). A rare asynchronous notice also reads as ended: that connection is
    replaced, needlessly but harmlessly."""
    try:
        descriptor = dbapi_connection.fileno()
    except Exception:  # no socket (closed already): the pool should replace it
        return True
    poller = select.poll()  # not select.select, which refuses descriptors from 1024 up
    poller.register(descriptor, select.POLLIN)
    return bool(poller.poll(0))


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """Session factory; objects stay readable after commit since results are plain data."""
    return sessionmaker(engine, expire_on_commit=False)
