"""Transient failures are retried, each attempt counted, and a job whose image host keeps
failing ends `dead` with a readable row (issue 14's mutation probe, (A) and (B))."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.integration.conftest import Stack, WorkerProcess, query
from tests.unit.fetch_servers import serve

pytestmark = pytest.mark.slow


def test_a_host_that_keeps_answering_503_is_retried_to_the_cap_then_dead(
    stack: Stack, worker: WorkerProcess, producer: Any
) -> None:
    listing_id = f"busy-host-{uuid.uuid4().hex[:8]}"
    with serve() as server:
        report = producer.enqueue(
            [
                {
                    "listing_id": listing_id,
                    "title": "a mug",
                    "image_url": f"{server.base_url}/status/503",
                }
            ],
            model="tiny",
        )
        counts = producer.wait(report.job_ids, timeout=90, poll_interval=0.2)
        asked = [seen.path for seen in server.requests]

    assert counts["dead"] == 1, (counts, worker.log()[-2000:])
    job = query(
        stack, "SELECT status, attempts, error FROM jobs WHERE job_id = :j", j=report.job_ids[0]
    )[0]
    assert job["status"] == "dead"
    assert job["attempts"] == 3  # LV_MAX_ATTEMPTS: every attempt counted, none beyond
    assert asked == ["/status/503"] * 3  # one fetch per attempt: it was really retried
    row = query(
        stack, "SELECT status, error FROM model_results WHERE listing_id = :l", l=listing_id
    )
    assert len(row) == 1 and row[0]["status"] == "failed"
    assert "gave up after 3 attempts" in row[0]["error"] and "503" in row[0]["error"]
