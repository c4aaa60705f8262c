"""A task revoked by an operator while pending (Flower, `celery control revoke`): Celery
discards it, and its job must still end in a terminal state with its row (SPEC)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from db import jobs, listings
from db.jobs import NewJob
from db.records import ListingRecord
from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query

pytestmark = pytest.mark.slow


def test_a_job_revoked_while_pending_ends_failed_with_its_row(
    stack: Stack, worker: WorkerProcess, producer: Any, image_root: Path
) -> None:
    path = images.save(images.product_image("teal"), image_root / "revoked.jpg")
    listing_id = f"revoked-{uuid.uuid4().hex[:8]}"
    job_id = uuid.uuid4()
    with producer.sessions.begin() as session:
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "a teal mug", None, None, [path.as_uri()])]
        )
        jobs.create_jobs(session, [NewJob(job_id, listing_id, "tiny")])
    # The operator revokes it; then its message arrives (as if it had waited in a backlog).
    producer.celery.control.revoke(str(job_id))
    time.sleep(1.0)  # the broadcast reaches the worker before the message does
    producer.send([NewJob(job_id, listing_id, "tiny")], producer.resolve_model("tiny"))

    counts = producer.wait([job_id], timeout=60, poll_interval=0.2)

    assert counts["failed"] == 1, (counts, worker.log()[-2000:])
    job = query(stack, "SELECT status, error FROM jobs WHERE job_id = :j", j=job_id)[0]
    assert job == {"status": "failed", "error": "revoked by an operator"}
    rows = query(
        stack, "SELECT status, error FROM model_results WHERE listing_id = :l", l=listing_id
    )
    assert rows == [{"status": "failed", "error": "revoked by an operator"}]
