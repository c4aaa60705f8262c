"""Which index-build errors fail a reindex run and which leave it for beat's watch; how a
build's progress reads."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import exc

from db.embedding_index import progress_words
from db.run_completion import passing


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.DeadlockDetected()), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.AdminShutdown()), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.ConnectionFailure()), True),
        (exc.OperationalError("connect", {}, psycopg.OperationalError("refused")), True),
        (exc.TimeoutError("QueuePool limit reached"), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.QueryCanceled()), True),
        (exc.OperationalError("connect", {}, psycopg.errors.TooManyConnections()), True),
        (exc.InternalError("CREATE", {}, psycopg.errors.ReadOnlySqlTransaction()), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.DiskFull()), False),
        (exc.DataError("CREATE INDEX", {}, psycopg.errors.DataException()), False),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.ProgramLimitExceeded()), False),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.OutOfMemory()), False),
        (exc.ProgrammingError("CREATE INDEX", {}, psycopg.errors.UndefinedObject()), False),
    ],
)
def test_passing_trouble_is_told_from_trouble_that_lasts(
    error: exc.SQLAlchemyError, passes: bool
) -> None:
    assert passing(error) is passes


def test_build_progress_counts_rows_where_postgresql_does_else_the_tables_blocks() -> None:
    assert progress_words("building index: loading tuples", 0, 0, 1405, 4800) == (
        "building index: loading tuples, 29% of the table"
    )
    assert progress_words("building index", 41, 100, 0, 0) == "building index, 41% of rows"
    assert progress_words("initializing", 0, 0, 0, 0) == "initializing"
