"""`Producer.enqueue` takes any number of events in one call (issue 14 #8: it failed above
13,107, PostgreSQL's 65,535 bind parameters)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from contract.broker import model_queue
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
        carried = [job for body in bodies for job in _job_ids(body)]
        assert sorted(carried) == sorted(map(str, report.job_ids))
    finally:
        client.delete(queue)
        with stack.engine.begin() as connection:
            connection.exec_driver_sql(
                "DELETE FROM listings WHERE listing_id LIKE %s", (f"{prefix}%",)
            )


def _job_ids(raw: bytes) -> list[str]:
    """The job ids a message carries (kombu's Redis envelope: base64 JSON body)."""
    _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return list(kwargs["job_ids"]) if "job_ids" in kwargs else [kwargs["job_id"]]
