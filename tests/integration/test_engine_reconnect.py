"""A pooled connection the server ended while it sat idle (a restart, an operator's
`pg_terminate_backend`) is replaced when it is taken from the pool, before any statement: the
next use succeeds instead of failing once per connection (which a worker logged as "database
trouble" and paid for with a retried job)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine, text

from db.engine import make_engine
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow


def _backend(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(stack: Stack, pid: int) -> None:
    """End one backend, as a restart ends them all, and wait until it is gone."""
    with stack.engine.connect() as connection:
        assert connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        for _ in range(100):
            alive = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one()
            if not alive:
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {pid} still there")


@pytest.mark.parametrize("single_statements", [True, False], ids=["single-statements", "sessions"])
def test_a_connection_ended_while_idle_is_replaced_at_checkout(
    stack: Stack, single_statements: bool
) -> None:
    engine = make_engine(stack.database_url, pool_size=1, single_statements=single_statements)
    try:
        first = _backend(engine)
        _terminate(stack, first)
        time.sleep(0.1)  # the server's goodbye reaches the idle socket
        second = _backend(engine)  # raised OperationalError for single statements before
        assert second != first
        assert _backend(engine) == second  # the new connection is kept, not replaced each time
    finally:
        engine.dispose()


def test_a_live_connection_on_a_high_descriptor_is_kept(stack: Stack) -> None:
    """A busy worker holds many sockets (kept image connections, pipes, a device's files), so
    its database connections can get descriptors from 1024 up, which `select.select` refuses:
    the check must still see them as alive, not replace them at every checkout."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) is below 1,200")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    filler = []
    try:
        while not filler or filler[-1] < 1030:  # the next descriptors are above 1024
            filler.append(os.open(os.devnull, os.O_RDONLY))
        engine = make_engine(stack.database_url, pool_size=1, single_statements=True)
        try:
            with engine.connect() as connection:
                assert connection.connection.dbapi_connection.fileno() > 1024  # type: ignore[union-attr]
            first = _backend(engine)
            assert _backend(engine) == first  # kept, not replaced
        finally:
            engine.dispose()
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
