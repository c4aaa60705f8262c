"""What Flower sees (issue 15): a listing that ends `failed` is a failed task in Celery's
events, with its readable error; a listing that succeeds is a succeeded task. A group message
with a failed listing is a failed task naming it."""

from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.integration.conftest import WorkerProcess

pytestmark = pytest.mark.slow


def test_a_failed_listing_is_a_failed_task_with_its_error(
    worker: WorkerProcess, producer: Any, image_root: Path
) -> None:
    bad = images.truncated_jpeg(image_root / f"events-bad-{uuid.uuid4().hex[:6]}.jpg")
    good = images.save(images.product_image("gold"), image_root / "events-good.jpg")
    seen: dict[str, dict[str, Any]] = {}
    ready, stop = threading.Event(), threading.Event()
    app = producer.celery

    def listen() -> None:
        with app.connection_for_read() as connection:

            def record(event: dict[str, Any]) -> None:
                seen[event["uuid"]] = event

            receiver = app.events.Receiver(
                connection, handlers={"task-failed": record, "task-succeeded": record}
            )
            ready.set()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError, OSError):
                    receiver.capture(limit=None, timeout=0.5, wakeup=False)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(10)
    tag = uuid.uuid4().hex[:6]

    def event(kind: str, path: Path) -> dict[str, str]:
        return {"listing_id": f"events-{kind}-{tag}", "title": "t", "image_url": path.as_uri()}

    # One event per call: single-job messages, each job its own task.
    alone = [producer.enqueue([event(k, p)], model="tiny") for k, p in (("bad", bad), ("ok", good))]
    # Two events in one call: one group message (LV_ENQUEUE_GROUP), one task for both.
    grouped = producer.enqueue([event("gbad", bad), event("gok", good)], model="tiny")
    job_ids = [r.job_ids[0] for r in alone] + grouped.job_ids
    counts = producer.wait(job_ids, timeout=60, poll_interval=0.2)
    assert counts["failed"] == 2 and counts["succeeded"] == 2, worker.log()[-2000:]
    failed_id, ok_id = (str(r.job_ids[0]) for r in alone)

    def group_failed() -> list[dict[str, Any]]:
        return [
            e
            for e in list(seen.values())
            if e["type"] == "task-failed" and f"events-gbad-{tag}" in e.get("exception", "")
        ]

    for _ in range(100):
        if failed_id in seen and ok_id in seen and group_failed():
            break
        threading.Event().wait(0.1)

    stop.set()
    thread.join(10)
    # One log line per job, with its listing, model, outcome and timings (issue 15).
    log = worker.log()
    assert f"listing_id=events-bad-{tag} model_id=tiny outcome=failed" in log
    assert f"listing_id=events-ok-{tag} model_id=tiny outcome=succeeded" in log
    assert "claim_ms=" in log and "write_ms=" in log
    for job_id in map(str, job_ids):  # only that line: Celery's own per-task lines are quiet
        lines = [line for line in log.splitlines() if job_id in line]
        assert len(lines) == 1, lines
    assert seen[failed_id]["type"] == "task-failed"
    assert "corrupt or truncated" in seen[failed_id]["exception"]
    assert seen[ok_id]["type"] == "task-succeeded"
    # The group's task failed too, naming its failed listing and why (Flower shows it).
    (group_event,) = group_failed()
    assert "1 of 2 listings failed" in group_event["exception"]
    assert "corrupt or truncated" in group_event["exception"]
    assert f"events-gok-{tag}" not in group_event["exception"]
