"""`Producer.enqueue` takes any number of events in one call (issue 14 #8: it failed above
13,107, PostgreSQL's 65,535 bind parameters), and records and sends a large one in slices."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from contract.broker import model_queue
from producer.enqueue import RECORD_SLICE
from tests.integration.conftest import Stack, query

pytestmark = pytest.mark.slow
UNCONSUMED = "lv-toy"  # no test worker holds it: the messages just wait in its queue


def test_one_enqueue_call_records_and_sends_14000_listings(stack: Stack, producer: Any) -> None:
    prefix = f"many-{uuid.uuid4().hex[:6]}-"
    events = [
        {"listing_id": f"{prefix}{i}", "title": f"item {i}", "image_url": f"https://x.test/{i}.jpg"}
        for i in range(14_000)
    ]
    client = redis.Redis.from_url(stack.broker_url)
    queue = model_queue(UNCONSUMED)
    before = client.llen(queue)
    try:
        report = producer.enqueue(events, model=UNCONSUMED)

        assert len(report.job_ids) == 14_000 and report.refused == []
        counts = producer.wait(report.job_ids, timeout=1)
        assert counts["queued"] == 14_000
        sent = query(
            stack,
            "SELECT count(*) AS n FROM jobs WHERE listing_id LIKE :p AND sent_at IS NOT NULL",
            p=f"{prefix}%",
        )
        assert sent[0]["n"] == 14_000
        # In group messages of LV_ENQUEUE_GROUP (16) jobs: 875 messages carry every job once.
        bodies = client.lrange(queue, 0, -1)[: client.llen(queue) - before]
        assert len(bodies) == 875
        assert carried(bodies) == sorted(map(str, report.job_ids))
    finally:
        forget(stack, client, queue, prefix)


def forget(stack: Stack, client: redis.Redis, queue: str, prefix: str) -> None:
    """Drop the test's messages and listings (their jobs go with them)."""
    client.delete(queue)
    with stack.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM listings WHERE listing_id LIKE %s", (f"{prefix}%",))


def carried(bodies: list[Any]) -> list[str]:
    """Every job id the messages carry, sorted."""
    return sorted(job for body in bodies for job in _job_ids(body))


def _job_ids(raw: bytes) -> list[str]:
    """The job ids a message carries (kombu's Redis envelope: base64 JSON body)."""
    _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return list(kwargs["job_ids"]) if "job_ids" in kwargs else [kwargs["job_id"]]


def test_a_large_call_sends_its_first_slice_before_recording_its_last(
    stack: Stack, producer: Any
) -> None:
    """A worker may start on the first jobs of a big call while the rest are recorded: each
    slice is committed and sent before the next is recorded, in whole group messages."""
    prefix = f"slices-{uuid.uuid4().hex[:6]}-"
    count = 2 * RECORD_SLICE + 100
    events = [
        {"listing_id": f"{prefix}{i}", "title": f"item {i}", "image_url": f"https://x.test/{i}.jpg"}
        for i in range(count)
    ]
    client = redis.Redis.from_url(stack.broker_url)
    queue = model_queue(UNCONSUMED)
    before = client.llen(queue)
    try:
        report = producer.enqueue(events, model=UNCONSUMED)

        rows = query(
            stack,
            "SELECT job_id, created_at, sent_at FROM jobs WHERE job_id = ANY(:ids)",
            ids=report.job_ids,
        )
        by_id = {row["job_id"]: row for row in rows}
        ordered = [by_id[job_id] for job_id in report.job_ids]  # in the events' order
        assert len(ordered) == count and all(row["sent_at"] is not None for row in ordered)
        first, last = ordered[:RECORD_SLICE], ordered[2 * RECORD_SLICE :]
        assert max(row["sent_at"] for row in first) <= min(row["created_at"] for row in last)
        assert len({row["created_at"] for row in ordered}) == 3  # three transactions
        # Whole messages of 16 per slice: 32 + 32 + 7 (100 = 6 x 16 + 4).
        bodies = client.lrange(queue, 0, -1)[: client.llen(queue) - before]
        assert len(bodies) == 71
        assert carried(bodies) == sorted(map(str, report.job_ids))
    finally:
        forget(stack, client, queue, prefix)
