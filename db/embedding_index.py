"""Each model's HNSW index on `embeddings`, always built with CREATE INDEX CONCURRENTLY: when a
worker of the model starts, or, for a reindex's target, once the backfill is done.

Adding a row to an HNSW index costs far more than building the index over rows already there:
here, 4,000 vectors of 512 dimensions took 5.7 ms each inserted into the index and 0.3 ms each
built after (1,024 dimensions: 9.7 against 0.5; pgvector/pgvector#877 and #559 report the same),
and the index was four fifths of PostgreSQL's work per listing with a simulated ViT-B-32. A
reindex writes a whole catalogue for a model nobody searches yet, so its index waits until the
backfill is done and is built before the run switches models (`db.run_completion`).

A concurrent build never makes other models' writers wait (a plain CREATE INDEX holds a lock
that stops every insert into `embeddings` for the whole build). One process builds at a time:
a session advisory lock, only ever tried, never waited for (a waiter holding a snapshot would
deadlock with the build, which waits for older snapshots). The build's connection is closed
afterwards, so neither the lock nor its settings reach the pool.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from db.locks import try_session_lock

log = logging.getLogger(__name__)
IndexState = Literal["valid", "invalid", "missing"]


def index_name(model_id: str) -> str:
    """A valid, unique index name for any model id."""
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() else "_" for c in model_id)[:30]
    return f"embeddings_hnsw_{safe}_{digest}"


def index_state(connection: Session | Connection, model_id: str) -> IndexState:
    """Whether the model's index exists, and whether PostgreSQL may use it (an interrupted
    concurrent build leaves an invalid one behind)."""
    valid = connection.scalar(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
        {"name": index_name(model_id)},
    )
    if valid is None:
        return "missing"
    return "valid" if valid else "invalid"


def build_index(engine: Engine, model_id: str, dim: int, memory: str | None = None) -> bool:
    """Build the model's index over the rows already there, replacing an invalid one; True once
    it is valid, False at once when another process is building it (that one finishes).

    `memory`: `maintenance_work_mem` for this build (`LV_INDEX_BUILD_MEMORY`), else the
    server's. pgvector builds the graph in it; past it the build is no faster than inserting
    row by row, and pgvector's NOTICE saying so is logged here as a warning.
    """
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            if not try_session_lock(connection, index_name(model_id)):
                return False
            _log_notices(connection, model_id)
            _unlimited(connection, memory)
            state = index_state(connection, model_id)
            if state == "invalid":
                connection.execute(
                    text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}")
                )
            if state != "valid":
                connection.execute(text(_create_sql(model_id, dim)))
            return index_state(connection, model_id) == "valid"
        finally:
            connection.invalidate()


def set_aside_empty_index(engine: Engine, model_id: str, dim: int) -> bool:
    """Drop the model's index if it holds no row (a worker for a reindex target started before
    the run and built it empty), so the backfill does not maintain it row by row; True if it
    was dropped. An index holding rows is kept: rebuilding it would cost more."""
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            if index_state(connection, model_id) != "valid":
                return False
            if not try_session_lock(connection, index_name(model_id)):
                return False
            if _holds_rows(connection, model_id, dim):
                return False
            connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}"))
            return True
        finally:
            connection.invalidate()


def _holds_rows(connection: Connection, model_id: str, dim: int) -> bool:
    """Whether the model's index holds a row, asked of the index itself (one step into its
    graph): `embeddings` has no index on `model_id` alone, so asking the table would read all
    of it when the model has no row."""
    connection.execute(text("SELECT set_config('enable_seqscan', 'off', false)"))
    probe = "[" + ",".join(["1"] * int(dim)) + "]"
    found = connection.scalar(
        text(
            f"SELECT 1 FROM embeddings WHERE model_id = '{_literal(model_id)}' "
            f"ORDER BY embedding::vector({int(dim)}) <=> CAST(:probe AS vector({int(dim)})) "
            "LIMIT 1"
        ),
        {"probe": probe},
    )
    return found is not None


def _unlimited(connection: Connection, memory: str | None) -> None:
    """A build may take long and waits for every older transaction: no statement or lock
    limit on its connection (closed afterwards)."""
    connection.execute(text("SELECT set_config('statement_timeout', '0', false)"))
    connection.execute(text("SELECT set_config('lock_timeout', '0', false)"))
    if memory:
        connection.execute(
            text("SELECT set_config('maintenance_work_mem', :m, false)"), {"m": memory}
        )


def _log_notices(connection: Connection, model_id: str) -> None:
    """pgvector tells with a NOTICE when the graph outgrows `maintenance_work_mem`."""
    raw = connection.connection.driver_connection
    add = getattr(raw, "add_notice_handler", None)
    if add is not None:
        add(
            lambda notice: log.warning(
                "HNSW index of %s: %s %s (LV_INDEX_BUILD_MEMORY)",
                model_id,
                notice.message_primary,
                notice.message_detail or "",
            )
        )


def _create_sql(model_id: str, dim: int) -> str:
    """The index's definition; queries repeat its cast and model filter (`db.embeddings`)."""
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index_name(model_id)} ON embeddings "
        f"USING hnsw ((embedding::vector({int(dim)})) vector_cosine_ops) "
        f"WHERE model_id = '{_literal(model_id)}'"
    )


def _literal(model_id: str) -> str:
    return model_id.replace("'", "''")
