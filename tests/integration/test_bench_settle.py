"""The bench settles the disk before its latency run: PostgreSQL checkpoints (what the runs
before left dirty is written out) and the OS flushes its dirty pages."""

from __future__ import annotations

import psycopg
from sqlalchemy import text

from bench.throughput import settle_disk
from contract.settings import load_settings
from tests.integration.conftest import Stack


def _requested_checkpoints(stack: Stack) -> int:
    with stack.engine.connect() as connection:
        version = int(connection.execute(text("SHOW server_version_num")).scalar_one())
        query = (  # PostgreSQL 17 moved the count to its own view
            "SELECT num_requested FROM pg_stat_checkpointer"
            if version >= 170000
            else "SELECT checkpoints_req FROM pg_stat_bgwriter"
        )
        return int(connection.execute(text(query)).scalar_one())


def test_settling_checkpoints_the_database(stack: Stack) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS settle_probe (n int)")
        connection.execute("INSERT INTO settle_probe SELECT generate_series(1, 1000)")
    before = _requested_checkpoints(stack)
    settle_disk(load_settings().with_servers(stack.database_url, stack.broker_url))
    assert _requested_checkpoints(stack) == before + 1
