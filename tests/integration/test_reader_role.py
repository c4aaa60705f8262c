"""The catalogue's poller can read its views and nothing else (issue 14, security)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow


def test_the_reader_role_reads_the_views_and_cannot_write(stack: Stack) -> None:
    login = f"poller_{uuid.uuid4().hex[:8]}"
    with stack.engine.begin() as connection:
        connection.execute(text(f"CREATE ROLE {login} LOGIN"))
        connection.execute(text(f"GRANT listing_vision_reader TO {login}"))
    with stack.engine.connect() as connection:
        connection.execute(text(f"SET ROLE {login}"))
        connection.execute(text("SELECT count(*) FROM listing_results")).scalar_one()
        connection.execute(text("SELECT count(*) FROM model_results")).scalar_one()
        connection.execute(text("SELECT count(*) FROM jobs")).scalar_one()
        with pytest.raises(ProgrammingError, match="permission denied"):
            connection.execute(text("DELETE FROM jobs"))
        connection.rollback()
        connection.execute(text(f"SET ROLE {login}"))
        with pytest.raises(ProgrammingError, match="permission denied"):
            connection.execute(text("SELECT count(*) FROM results"))
        connection.rollback()
