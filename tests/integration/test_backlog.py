"""Fault 7 of issue 14: a backlog of ten times what a worker holds at once (its concurrency)
is queued before any worker runs; one worker drains it, every job once. The drain time is
printed (`pytest -s`) and recorded in docs/reliability.md; it is not asserted beyond a loose
bound, since this machine's speed is not the system's."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Stack, query, start_worker, stop_worker
from tests.integration.fault_helpers import MODEL, assert_each_job_ended_once, catalogue

pytestmark = pytest.mark.slow
CONCURRENCY = 64  # the worker's task threads for MODEL (2 x its batch of 32)


def test_a_backlog_of_ten_times_the_workers_concurrency_drains(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    prefix = f"backlog-{uuid.uuid4().hex[:6]}"
    count = 10 * CONCURRENCY
    report = producer.enqueue(catalogue(image_root, prefix, count), model=MODEL)
    assert len(report.job_ids) == count

    worker = start_worker(stack, worker_env, tmp_path / "worker.log", model=MODEL)
    started = time.monotonic()
    try:
        counts = producer.wait(report.job_ids, timeout=600, poll_interval=0.5)
        drained = time.monotonic() - started
    finally:
        stop_worker(worker)

    print(f"\nbacklog of {count} listings drained in {drained:.1f}s ({count / drained:.0f}/s)")
    assert counts["succeeded"] == count, (counts, worker.log()[-3000:])
    assert_each_job_ended_once(stack, report.job_ids, prefix)
    attempts = query(
        stack,
        "SELECT max(attempts) AS most FROM jobs WHERE job_id = ANY(:ids)",
        ids=list(report.job_ids),
    )
    assert attempts == [{"most": 1}]  # nothing was redelivered or re-sent along the way
