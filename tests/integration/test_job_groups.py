"""Group messages (LV_ENQUEUE_GROUP): one `enqueue` call's jobs travel and run together, and
come out as they would one by one; what a group cannot finish goes on as single jobs."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from contract.broker import (
    ANALYZE_GROUP_TASK,
    ANALYZE_TASK,
    make_celery,
    model_queue,
    send_analysis,
)
from db import jobs, listings
from db.engine import make_sessions
from db.jobs import NewJob
from db.records import ListingRecord
from producer.enqueue import Producer
from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query, settings_from
from tests.unit.fetch_servers import serve

pytestmark = pytest.mark.slow
COLOURS = ["red", "blue", "green", "gold", "purple", "teal"]
SHAPES = ["circle", "square", "triangle"]
# A size of this module's own: the session's database is shared, and other modules' similarity
# searches must not find these images.
SIZE = (73, 67)
COMPARED = "status, error, similarity, is_match, top_category, category_mismatch, images_failed"


def _events(image_root: Path, prefix: str) -> list[dict[str, Any]]:
    """Listings with real images (one with two, one whose only image is not an image)."""
    events = []
    for i, colour in enumerate(COLOURS):
        path = images.save(
            images.product_image(colour, SHAPES[i % 3], SIZE), image_root / f"group-{colour}.jpg"
        )
        events.append({"title": f"{colour} mug", "image_urls": [path.as_uri()]})
    events[1]["image_urls"].append(events[2]["image_urls"][0])
    events[3]["category"] = "mug"
    broken = image_root / "group-broken.jpg"
    broken.write_text("not an image")
    events.append({"title": "a broken one", "image_urls": [broken.as_uri()]})
    return [{"listing_id": f"{prefix}-{n}", **event} for n, event in enumerate(events)]


def _rows(stack: Stack, prefix: str) -> dict[str, dict[str, Any]]:
    rows = query(
        stack,
        f"SELECT listing_id, {COMPARED} FROM model_results "
        "WHERE model_id = 'tiny' AND listing_id LIKE :p",
        p=f"{prefix}-%",
    )
    return {row.pop("listing_id").removeprefix(prefix): row for row in rows}


def test_a_group_gives_the_rows_single_jobs_give(
    stack: Stack, worker: WorkerProcess, worker_env: dict[str, str], image_root: Path
) -> None:
    grouped, single = f"grp-{uuid.uuid4().hex[:6]}", f"one-{uuid.uuid4().hex[:6]}"
    with Producer(settings_from({**worker_env, "LV_ENQUEUE_GROUP": "4"})) as producer:
        first = producer.enqueue(_events(image_root, grouped), model="tiny")
        assert producer.wait(first.job_ids, timeout=60)["succeeded"] == 6
    with Producer(settings_from({**worker_env, "LV_ENQUEUE_GROUP": "1"})) as producer:
        second = producer.enqueue(_events(image_root, single), model="tiny")
        assert producer.wait(second.job_ids, timeout=60)["succeeded"] == 6

    together, alone = _rows(stack, grouped), _rows(stack, single)
    assert len(together) == 7 and together.keys() == alone.keys()
    for key, row in together.items():
        other = alone[key]
        assert row.pop("similarity") == pytest.approx(other.pop("similarity"), abs=1e-5), key
        assert row == other, key
    assert together["-6"]["status"] == "failed" and together["-6"]["error"]
    # 7 jobs in groups of 4: two group messages, each job its own attempt and log line.
    states = query(
        stack,
        "SELECT status, attempts, batch_size FROM jobs WHERE job_id = ANY(:ids)",
        ids=first.job_ids,
    )
    assert sorted(s["attempts"] for s in states) == [1] * 7
    assert max(s["batch_size"] or 0 for s in states) > 1  # listings batched together
    logged = worker.log()
    assert all(logged.count(f"job {job_id} ") == 1 for job_id in first.job_ids)


def test_a_group_hands_its_interrupted_and_transient_jobs_on_as_single_jobs(
    stack: Stack, worker: WorkerProcess, image_root: Path
) -> None:
    """An interrupted job (an earlier attempt never finished: it may have killed its worker)
    runs alone; a transient failure is retried alone to its cap; the rest finish together."""
    prefix = f"hand-{uuid.uuid4().hex[:6]}"
    good = images.save(images.product_image("red", "circle", SIZE), image_root / "hand-red.jpg")
    sessions = make_sessions(stack.engine)
    with serve() as server:
        urls = [good.as_uri(), good.as_uri(), good.as_uri(), f"{server.base_url}/status/503"]
        records = [
            ListingRecord(f"{prefix}-{n}", f"mug {n}", None, None, [url], None)
            for n, url in enumerate(urls)
        ]
        new_jobs = [NewJob(uuid.uuid4(), record.listing_id, "tiny") for record in records]
        with sessions.begin() as session:
            listings.upsert_listings(session, records)
            jobs.create_jobs(session, new_jobs)
        ids = [job.job_id for job in new_jobs]
        interrupted = ids[1]
        with stack.engine.begin() as connection:
            updated = connection.execute(
                text(
                    "UPDATE jobs SET status = 'running', attempts = 1, started_at = now() "
                    "- interval '1 hour', worker = 'a dead worker' WHERE job_id = :j"
                ),
                {"j": interrupted},
            )
            assert updated.rowcount == 1
        app = make_celery(settings_from(worker.env))
        send_analysis(app, ids, "tiny", group_size=len(ids))
        deadline_rows = _wait_finished(stack, ids, timeout=90)
        asked = [seen.path for seen in server.requests]

    by_id = {row["job_id"]: row for row in deadline_rows}
    assert by_id[ids[0]]["status"] == by_id[ids[2]]["status"] == "succeeded"
    assert by_id[ids[0]]["attempts"] == by_id[ids[2]]["attempts"] == 1
    assert by_id[interrupted]["status"] == "succeeded" and by_id[interrupted]["attempts"] == 2
    assert by_id[ids[3]]["status"] == "dead" and by_id[ids[3]]["attempts"] == 3
    assert asked == ["/status/503"] * 3, worker.log()[-3000:]
    assert "gave up after 3 attempts" in (by_id[ids[3]]["error"] or "")


def test_a_second_delivery_of_a_job_running_in_its_group_waits_and_costs_no_attempt(
    stack: Stack, worker: WorkerProcess
) -> None:
    """The reconciler re-sends a group's jobs as single-job messages while the group still runs
    them (a worker slow to start under load did this). The copies must not claim the running
    jobs as interrupted: that cost each an attempt, and a poison listing's crash then a second
    (tests/integration/test_crash_input.py failed so on a loaded CI machine)."""
    prefix = f"dup-{uuid.uuid4().hex[:6]}"
    sessions = make_sessions(stack.engine)
    with serve() as server:
        records = [
            ListingRecord(
                f"{prefix}-{n}", f"mug {n}", None, None, [f"{server.base_url}/slow/1.5?n={n}"], None
            )
            for n in range(3)
        ]
        new_jobs = [NewJob(uuid.uuid4(), record.listing_id, "tiny") for record in records]
        with sessions.begin() as session:
            listings.upsert_listings(session, records)
            jobs.create_jobs(session, new_jobs)
        ids = [job.job_id for job in new_jobs]
        app = make_celery(settings_from(worker.env))
        send_analysis(app, ids, "tiny", group_size=len(ids))
        time.sleep(0.5)  # the group has claimed its jobs and waits for their images
        send_analysis(app, ids, "tiny", group_size=1)
        rows = _wait_finished(stack, ids, timeout=60)
        time.sleep(1.0)  # the copies' deliveries have ended too
        fetched = len(server.requests)

    assert [(r["status"], r["attempts"]) for r in rows] == [("succeeded", 1)] * 3, rows
    assert fetched == 3, worker.log()[-3000:]
    logged = worker.log()
    assert all(logged.count(f"job {job_id} succeeded") == 1 for job_id in ids), logged[-3000:]


def test_group_messages_go_out_by_the_group_size(stack: Stack, worker_env: dict[str, str]) -> None:
    """Published, not consumed: a model no worker serves (its queue is read, then emptied)."""
    app = make_celery(settings_from(worker_env))
    ids = [uuid.uuid4() for _ in range(9)]
    send_analysis(app, ids, "nobody-serves-this", group_size=4)
    client = redis.Redis.from_url(stack.broker_url)
    queue = model_queue("nobody-serves-this")
    try:
        bodies = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.delete(queue)
    tasks = sorted((b["headers"]["task"], len(_job_ids(b))) for b in bodies)
    assert tasks == [(ANALYZE_TASK, 1), (ANALYZE_GROUP_TASK, 4), (ANALYZE_GROUP_TASK, 4)]
    assert sorted(i for b in bodies for i in _job_ids(b)) == sorted(map(str, ids))


def _job_ids(body: dict[str, Any]) -> list[str]:
    _, kwargs, _ = json.loads(base64.b64decode(body["body"]))
    return kwargs["job_ids"] if "job_ids" in kwargs else [kwargs["job_id"]]


def _wait_finished(stack: Stack, ids: list[uuid.UUID], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = query(
            stack,
            "SELECT job_id, status, attempts, error FROM jobs WHERE job_id = ANY(:ids)",
            ids=ids,
        )
        if all(r["status"] in {"succeeded", "failed", "dead"} for r in rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"jobs not finished: {rows}")
        time.sleep(0.3)


def test_a_job_revoked_by_its_id_while_in_a_group_ends_failed_and_the_rest_run(
    stack: Stack, worker: WorkerProcess, producer: Any, image_root: Path
) -> None:
    """`celery control revoke JOB_ID` (Flower's revoke) reaches jobs waiting in a group too."""
    prefix = f"rvk-{uuid.uuid4().hex[:6]}"
    good = images.save(images.product_image("blue", "square", SIZE), image_root / "rvk.jpg")
    records = [
        ListingRecord(f"{prefix}-{n}", f"box {n}", None, None, [good.as_uri()], None)
        for n in range(3)
    ]
    new_jobs = [NewJob(uuid.uuid4(), record.listing_id, "tiny") for record in records]
    with make_sessions(stack.engine).begin() as session:
        listings.upsert_listings(session, records)
        jobs.create_jobs(session, new_jobs)
    ids = [job.job_id for job in new_jobs]
    producer.celery.control.revoke(str(ids[1]))
    deadline = time.monotonic() + 20
    while not any(
        str(ids[1]) in (revoked or [])
        for revoked in (producer.celery.control.inspect(timeout=1).revoked() or {}).values()
    ):
        assert time.monotonic() < deadline, "the worker never learnt of the revoke"
    send_analysis(producer.celery, ids, "tiny", group_size=3)

    rows = {row["job_id"]: row for row in _wait_finished(stack, ids, timeout=60)}

    assert rows[ids[1]]["status"] == "failed" and rows[ids[1]]["error"] == "revoked by an operator"
    assert rows[ids[0]]["status"] == rows[ids[2]]["status"] == "succeeded"
    result = query(
        stack, "SELECT status, error FROM model_results WHERE listing_id = :l", l=f"{prefix}-1"
    )
    assert result == [{"status": "failed", "error": "revoked by an operator"}]


def test_two_jobs_of_one_listing_in_a_group_each_run_once_on_their_own_claim(
    stack: Stack, worker: WorkerProcess, image_root: Path
) -> None:
    listing_id = f"twice-{uuid.uuid4().hex[:6]}"
    good = images.save(images.product_image("gold", "square", SIZE), image_root / "twice.jpg")
    record = ListingRecord(listing_id, "a gold box", None, None, [good.as_uri()], None)
    new_jobs = [NewJob(uuid.uuid4(), listing_id, "tiny") for _ in range(2)]
    with make_sessions(stack.engine).begin() as session:
        listings.upsert_listings(session, [record])
        jobs.create_jobs(session, new_jobs)
    ids = [job.job_id for job in new_jobs]
    send_analysis(make_celery(settings_from(worker.env)), ids, "tiny", group_size=2)

    rows = _wait_finished(stack, ids, timeout=60)

    assert [(r["status"], r["attempts"]) for r in rows] == [("succeeded", 1)] * 2, rows
