"""Each model's HNSW index on `embeddings`: created while it is empty when a model starts
serving, or built in one pass once a reindex has embedded the catalogue with it.

Adding a row to an HNSW index costs far more than building the index over rows already there:
here, 4,000 vectors of 512 dimensions took 5.7 ms each inserted into the index and 0.3 ms each
built after (1,024 dimensions: 9.7 against 0.5; pgvector/pgvector#877 and #559 report the same),
and the index was four fifths of PostgreSQL's work per listing with a simulated ViT-B-32. A
reindex writes a whole catalogue for a model nobody searches yet, so its index waits until the
backfill is done and is then built with CREATE INDEX CONCURRENTLY, which never makes the
active model's writers wait, before the run switches models (`db.run_completion`).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from sqlalchemy import Connection, Engine, exists, select, text
from sqlalchemy.orm import Session

from db.locks import transaction_lock, try_session_lock
from db.schema import Embedding

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


def ensure_index(session: Session, model_id: str, dim: int) -> None:
    """Create the model's cosine HNSW index if missing (a worker does, once it knows `dim`).

    In a transaction: quick while the model has few rows, and workers starting together for
    one model take turns (an advisory lock). No statement limit: a model that already holds a
    catalogue of rows (a cancelled reindex) may take long.
    """
    if index_state(session, model_id) == "valid":
        return
    transaction_lock(session, index_name(model_id))
    session.execute(text("SET LOCAL statement_timeout = 0"))
    if index_state(session, model_id) == "invalid":
        session.execute(text(f"DROP INDEX IF EXISTS {index_name(model_id)}"))
    session.execute(text(_create_sql(model_id, dim, "")))


def build_index(engine: Engine, model_id: str, dim: int) -> bool:
    """Build the model's index over the rows already there without blocking writers (CREATE
    INDEX CONCURRENTLY), replacing an invalid one; True once it is valid, False at once when
    another process is building it (that one finishes the job).

    The build uses the server's `maintenance_work_mem`: pgvector builds much faster when the
    graph fits in it (it says so in a NOTICE when it does not).
    """
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            if not try_session_lock(connection, index_name(model_id)):
                return False
            connection.execute(text("SELECT set_config('statement_timeout', '0', false)"))
            connection.execute(text("SELECT set_config('lock_timeout', '0', false)"))
            state = index_state(connection, model_id)
            if state == "invalid":
                connection.execute(
                    text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}")
                )
            if state != "valid":
                connection.execute(text(_create_sql(model_id, dim, "CONCURRENTLY")))
            return index_state(connection, model_id) == "valid"
        finally:
            # Its settings and its session lock go with it: the pool never sees this connection.
            connection.invalidate()


def set_aside_empty_index(engine: Engine, model_id: str) -> bool:
    """Drop the model's index if the model has no embedding yet (a worker for a reindex target
    started before the run and created it empty), so the backfill does not maintain it row by
    row; True if it was dropped. An index holding rows is kept: rebuilding it would cost more."""
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            if index_state(connection, model_id) == "missing":
                return False
            if not try_session_lock(connection, index_name(model_id)):
                return False
            if connection.scalar(select(exists().where(Embedding.model_id == model_id))):
                return False
            connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}"))
            return True
        finally:
            connection.invalidate()


def _create_sql(model_id: str, dim: int, how: str) -> str:
    """The index's definition; queries repeat its cast and model filter (`db.embeddings`)."""
    literal = model_id.replace("'", "''")
    return (
        f"CREATE INDEX {how} IF NOT EXISTS {index_name(model_id)} ON embeddings "
        f"USING hnsw ((embedding::vector({int(dim)})) vector_cosine_ops) "
        f"WHERE model_id = '{literal}'"
    )
