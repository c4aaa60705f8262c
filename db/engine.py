"""Engines and sessions; the one place that knows how a database URL becomes a connection."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


def sqlalchemy_url(url: str) -> str:
    """Use psycopg 3 for plain `postgresql://` URLs (what pgserver and most tools print)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(
    url: str, *, pool_size: int = 5, application_name: str = "listing-vision"
) -> Engine:
    """An engine that survives database restarts (pre-ping) and names itself in pg_stat_activity."""
    return create_engine(
        sqlalchemy_url(url),
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"application_name": application_name, "connect_timeout": 10},
    )


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    """Session factory; objects stay readable after commit since results are plain data."""
    return sessionmaker(engine, expire_on_commit=False)
