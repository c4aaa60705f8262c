"""Fault injection with real servers and real worker processes (issue 14). The invariant in
each: every job ends in exactly one terminal state, each listing has one result row, no job
exceeds its attempt cap, and the system recovers by itself."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import model_queue
from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query, start_worker, stop_worker

pytestmark = pytest.mark.slow
MODEL = "tiny-batch"  # its own queue: the session's worker (model "tiny") never sees these
SHORT = {"LV_VISIBILITY_TIMEOUT": "8", "LV_TASK_TIME_LIMIT": "5", "LV_MAX_ATTEMPTS": "3"}


def catalogue(image_root: Path, prefix: str, count: int) -> list[dict[str, Any]]:
    colours = ["red", "blue", "green", "gold", "purple", "teal", "black", "orange"]
    events = []
    for i in range(count):
        path = image_root / f"{prefix}-{i}.jpg"
        images.save(images.product_image(colours[i % 8], "square", (50 + i, 60)), path)
        events.append(
            {"listing_id": f"{prefix}-{i}", "title": f"item {i}", "image_url": path.as_uri()}
        )
    return events


def wait_until_some_succeeded(
    producer: Any, job_ids: Sequence[uuid.UUID], worker: WorkerProcess, some: int = 4
) -> None:
    """Until the run is under way: a few jobs finished, most still to come."""
    deadline = time.monotonic() + 60
    while producer.wait(job_ids, timeout=0)["succeeded"] < some:
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.02)


def finish_with_a_replacement(
    stack: Stack, env: dict[str, str], producer: Any, job_ids: Sequence[uuid.UUID], log: Path
) -> None:
    """A fresh worker must finish every job (each exactly once)."""
    replacement = start_worker(stack, env, log, model=MODEL)
    try:
        counts = producer.wait(job_ids, timeout=90, poll_interval=0.5)
    finally:
        stop_worker(replacement)
    assert counts["succeeded"] == len(job_ids), (counts, replacement.log()[-3000:])


def assert_each_job_ended_once(stack: Stack, job_ids: Sequence[uuid.UUID], prefix: str) -> None:
    jobs = query(
        stack, "SELECT status, attempts FROM jobs WHERE job_id = ANY(:ids)", ids=list(job_ids)
    )
    assert len(jobs) == len(job_ids)
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    assert all(1 <= job["attempts"] <= 3 for job in jobs), jobs
    rows = query(
        stack,
        "SELECT listing_id, count(*) AS n FROM results WHERE model_id = :m "
        "AND listing_id LIKE :p GROUP BY listing_id",
        m=MODEL,
        p=f"{prefix}-%",
    )
    assert len(rows) == len(job_ids) and all(row["n"] == 1 for row in rows)


def test_a_worker_killed_mid_batch_loses_nothing(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:6]}"
    env = {**worker_env, **SHORT}
    doomed = start_worker(stack, env, tmp_path / "doomed.log", model=MODEL)
    report = producer.enqueue(catalogue(image_root, prefix, 48), model=MODEL)
    try:
        wait_until_some_succeeded(producer, report.job_ids, doomed)
        doomed.process.send_signal(signal.SIGKILL)  # mid-run: messages unacked, jobs running
        doomed.process.wait()
    finally:
        if doomed.process.poll() is None:
            doomed.process.kill()
    counts = producer.wait(report.job_ids, timeout=0)
    assert counts["succeeded"] < 48, "the worker finished before it was killed"

    finish_with_a_replacement(stack, env, producer, report.job_ids, tmp_path / "replacement.log")
    assert_each_job_ended_once(stack, report.job_ids, prefix)


def test_jobs_lost_by_a_broker_restarted_empty_are_sent_again(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    prefix = f"lost-{uuid.uuid4().hex[:6]}"
    report = producer.enqueue(catalogue(image_root, prefix, 12), model=MODEL)
    # Valkey restarted without persistence: every queued message is gone, the jobs remain.
    redis.Redis.from_url(stack.broker_url).delete(model_queue(MODEL))

    env = {**worker_env, **SHORT}
    finish_with_a_replacement(stack, env, producer, report.job_ids, tmp_path / "worker.log")
    assert_each_job_ended_once(stack, report.job_ids, prefix)


def test_a_worker_stopped_mid_run_finishes_or_returns_its_jobs(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    """SIGTERM (a deploy, Ctrl-C in `up`): warm shutdown finishes what runs and returns what
    it had reserved; a replacement finishes the rest at once, not after a visibility timeout."""
    prefix = f"term-{uuid.uuid4().hex[:6]}"
    env = {**worker_env, "LV_VISIBILITY_TIMEOUT": "3600", "LV_TASK_TIME_LIMIT": "60"}
    stopping = start_worker(stack, env, tmp_path / "stopping.log", model=MODEL)
    report = producer.enqueue(catalogue(image_root, prefix, 48), model=MODEL)
    wait_until_some_succeeded(producer, report.job_ids, stopping)
    stopping.process.send_signal(signal.SIGTERM)
    assert stopping.process.wait(60) == 0, stopping.log()[-3000:]

    finish_with_a_replacement(stack, env, producer, report.job_ids, tmp_path / "replacement.log")
    assert_each_job_ended_once(stack, report.job_ids, prefix)
