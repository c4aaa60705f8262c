"""Database trouble around a job: a retry whose wait grows with each redelivery (issue 14 #9:
it was a constant ~4 s, forever)."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta
from pathlib import Path

from contract.registry import get_spec, load_registry
from db.engine import make_engine, make_sessions
from tests.unit.test_analysis import analyzer as listing_analyzer
from worker.job_runner import JobRunner
from worker.outcomes import OutcomeWriter
from worker.shared_queries import SharedQueries


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_retries_for_a_database_that_is_down_back_off_exponentially(tmp_path: Path) -> None:
    url = f"postgresql://lv@127.0.0.1:{closed_port()}/lv"  # nothing listens: connect refused
    sessions = make_sessions(make_engine(url))
    queries = SharedQueries(
        make_sessions(make_engine(url, single_statements=True)),
        model_id="m",
        worker="w",
        max_attempts=3,
        attempt_limit=timedelta(seconds=60),
    )
    toy = get_spec(load_registry(), "lv-toy")
    analyzer = listing_analyzer(toy, tmp_path, with_categories=False)  # the claim fails first
    runner = JobRunner(sessions, queries, analyzer, OutcomeWriter(sessions), "m", "w", 3, 1.0)
    try:
        waits = [runner.run(uuid.uuid4(), redeliveries=n).retry_in for n in range(5)]
    finally:
        queries.close()
        runner.writer.close()

    analyzer.service.close()
    assert all(wait is not None for wait in waits)
    assert waits[0] is not None and waits[4] is not None
    assert 1.5 <= waits[0] <= 2.5  # base 1 s x 2, with jitter
    assert waits[4] >= 4 * waits[0] * 0.8 / 1.2  # doubling per redelivery


def test_no_retry_waits_longer_than_the_runners_ceiling(tmp_path: Path) -> None:
    """Fault 5: a retry's wait counts against the visibility timeout (the worker holds its
    message unacknowledged until it is due), so it is capped (`worker.runtime.retry_ceiling`)."""
    url = f"postgresql://lv@127.0.0.1:{closed_port()}/lv"
    sessions = make_sessions(make_engine(url))
    queries = SharedQueries(
        make_sessions(make_engine(url, single_statements=True)),
        model_id="m",
        worker="w",
        max_attempts=3,
        attempt_limit=timedelta(seconds=60),
    )
    analyzer = listing_analyzer(get_spec(load_registry(), "lv-toy"), tmp_path, False)
    runner = JobRunner(
        sessions, queries, analyzer, OutcomeWriter(sessions), "m", "w", 3, 1.0, retry_ceiling=3.0
    )
    try:
        waits = [runner.run(uuid.uuid4(), redeliveries=n).retry_in for n in range(6)]
    finally:
        queries.close()
        runner.writer.close()
        analyzer.service.close()
    assert waits[0] is not None and waits[0] < 3.0
    assert waits[5] == 3.0  # 64 s of backoff, capped
