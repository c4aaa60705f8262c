"""Which index-build errors fail a reindex run and which leave it for beat's watch."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import exc

from db.run_completion import passing


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.DeadlockDetected()), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.AdminShutdown()), True),
        (exc.OperationalError("CREATE INDEX", {}, psycopg.errors.ConnectionFailure()), True),
        (exc.OperationalError("connect", {}, psycopg.OperationalError("refused")), True),
        (exc.TimeoutError("QueuePool limit reached"), True),
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
