"""Each model's HNSW index on `embeddings`, always built with CREATE INDEX CONCURRENTLY: when a
worker of the model starts, or, for a reindex's target, once the backfill is done.

Adding a row to an HNSW index costs far more than building the index over rows already there:
here, 4,000 vectors of 512 dimensions took 5.7 ms each inserted into the index and 0.3 ms each
built after (1,024 dimensions: 9.7 against 0.5; pgvector/pgvector#877 and #559 report the same),
and the index was four fifths of PostgreSQL's work per listing with a simulated ViT-B-32. A
reindex writes a whole catalogue for a model nobody searches yet, so its index waits until the
backfill is done and is built before the run switches models (`db.run_completion`).

A concurrent build never makes other models' writers wait (a plain CREATE INDEX holds a lock
that stops every insert into `embeddings` for the whole build). One build or drop runs at a
time on the table, whatever its model: two concurrent builds (or a build and a concurrent drop)
on one table wait for each other's snapshots, and PostgreSQL ends one as a deadlock, often the
one nearly done. So every build and drop holds one session advisory lock, only ever tried,
never waited for (a waiter holding a snapshot would deadlock with the build too); who finds it
taken tries again later. The build's connection is closed afterwards, so neither the lock nor
its settings reach the pool.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from db.locks import lock_held, try_session_lock

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
    with _builder(engine, model_id) as connection:
        if connection is None:
            return False
        _log_notices(connection, model_id)
        _unlimited(connection, memory)
        state = index_state(connection, model_id)
        if state == "invalid":
            connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}"))
        if state != "valid":
            connection.execute(text(_create_sql(model_id, dim)))
        return index_state(connection, model_id) == "valid"


def set_aside_empty_index(engine: Engine, model_id: str, dim: int) -> bool:
    """Drop the model's index if it holds no row (a worker for a reindex target started before
    the run and built it empty) or is invalid (an interrupted build's, which PostgreSQL still
    maintains on every insert), so the backfill does not maintain it row by row; True if it
    was dropped. A valid index holding rows is kept: rebuilding it would cost more."""
    if _state_now(engine, model_id) == "missing":
        return False
    with _builder(engine, model_id) as connection:
        if connection is None:
            return False
        state = index_state(connection, model_id)
        if state == "missing" or (state == "valid" and _holds_rows(connection, model_id, dim)):
            return False
        connection.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model_id)}"))
        return True


def build_progress(connection: Session | Connection, model_id: str) -> str | None:
    """What a build of the model's index under way is doing, as PostgreSQL reports it
    (`pg_stat_progress_create_index`), e.g. "building index: loading tuples, 41% of the
    table"; "waiting for another HNSW index build" when another build holds the build lock;
    None when neither."""
    # Before the index exists (initializing, waiting for the table lock) the progress row's
    # index_relid is 0: the build is recognised by its statement, which names the index.
    row = connection.execute(
        text(
            "SELECT p.phase, p.tuples_done, p.tuples_total, p.blocks_done, p.blocks_total "
            "FROM pg_stat_progress_create_index p JOIN pg_stat_activity a ON a.pid = p.pid "
            "LEFT JOIN pg_class c ON c.oid = p.index_relid "
            "WHERE c.relname = :name OR strpos(a.query, :name) > 0 LIMIT 1"
        ),
        {"name": index_name(model_id)},
    ).first()
    if row is not None:
        return progress_words(
            row.phase, row.tuples_done, row.tuples_total, row.blocks_done, row.blocks_total
        )
    if lock_held(connection, index_name(model_id)):
        return "starting its build"
    if build_under_way(connection):
        return WAITING_FOR_ANOTHER_BUILD
    return None


def progress_words(
    phase: str, tuples_done: int, tuples_total: int, blocks_done: int, blocks_total: int
) -> str:
    """A progress row in words: the share of rows where PostgreSQL counts them, else of the
    table's blocks (pgvector's HNSW build counts blocks read while it loads rows)."""
    if tuples_total:
        return f"{phase}, {100 * tuples_done / tuples_total:.0f}% of rows"
    if blocks_total:
        return f"{phase}, {100 * blocks_done / blocks_total:.0f}% of the table"
    return phase


BUILD_LOCK = "embeddings-hnsw-build"  # one build or drop on the table at a time
WAITING_FOR_ANOTHER_BUILD = "waiting for another model's HNSW index build"


def build_under_way(connection: Session | Connection) -> bool:
    """Whether some process holds the build lock: building or dropping an index, any model's."""
    return lock_held(connection, BUILD_LOCK)


def vector_cast(dim: int) -> str:
    """The type every query of a model's index casts `embedding` to, as the index does."""
    return f"vector({int(dim)})"


def model_literal(model_id: str) -> str:
    """The model filter as a quoted literal: a bound parameter would not match the partial
    index's predicate, so the planner would not use it."""
    return "'" + model_id.replace("'", "''") + "'"


def holds_rows_sql(model_id: str, dim: int) -> str:
    """The probe `_holds_rows` runs (its plan is tested to be the index's)."""
    cast = vector_cast(dim)
    return (
        f"SELECT 1 FROM embeddings WHERE model_id = {model_literal(model_id)} "
        f"ORDER BY embedding::{cast} <=> CAST(:probe AS {cast}) LIMIT 1"
    )


@contextmanager
def _builder(engine: Engine, model_id: str) -> Iterator[Connection | None]:
    """A connection of its own, outside any transaction, holding the build lock (any model's
    build or drop) and, to say whose, the model's; None when another process holds the build
    lock. Closed afterwards, never pooled: the locks and the settings made on it go with it."""
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = try_session_lock(connection, BUILD_LOCK)
            yield (
                connection if taken and try_session_lock(connection, index_name(model_id)) else None
            )
        finally:
            # Released now: closing the connection releases them only once its backend has
            # exited, which a build started right after could find still holding them.
            with suppress(SQLAlchemyError):
                connection.execute(text("SELECT pg_advisory_unlock_all()"))
            connection.invalidate()


def _state_now(engine: Engine, model_id: str) -> IndexState:
    with engine.connect() as connection:
        return index_state(connection, model_id)


def _holds_rows(connection: Connection, model_id: str, dim: int) -> bool:
    """Whether the model's index holds a row, asked of the index itself (one step into its
    graph): `embeddings` has no index on `model_id` alone, so asking the table would read all
    of it when the model has no row."""
    connection.execute(text("SELECT set_config('enable_seqscan', 'off', false)"))
    found = connection.scalar(text(holds_rows_sql(model_id, dim)), {"probe": _probe(dim)})
    return found is not None


def _probe(dim: int) -> str:
    return "[" + ",".join(["1"] * int(dim)) + "]"


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
        f"USING hnsw ((embedding::{vector_cast(dim)}) vector_cosine_ops) "
        f"WHERE model_id = {model_literal(model_id)}"
    )
