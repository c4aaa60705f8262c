"""`listing-vision exporter`: the deployment's queue depth, backlog and run progress, scraped
over HTTP from the real command and parsed with prometheus_client's own parser."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from contract.broker import ANALYZE_TASK, AnalyzeMessage, make_celery, queue_keys, send_analysis
from db import jobs, listings
from db.jobs import NewJob
from db.records import ListingRecord
from listing_vision.exporter import METRICS
from tests.integration.conftest import Stack, free_port, sessions_with_model, settings_from

pytestmark = pytest.mark.slow
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, log: Path, timeout: float = 60) -> Samples:
    """The exporter's samples, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                body = answer.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"exporter not answering:\n{log.read_text(errors='replace')}")
            time.sleep(0.3)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def start_exporter(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "listing_vision", "exporter", "--host=127.0.0.1"],
            env={**env, "LV_EXPORTER_PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    return process.wait(30)


@pytest.fixture
def backlog(stack: Stack, worker_env: dict[str, str]) -> Iterator[str]:
    """A model no worker holds, with four queued jobs (sent, one at priority 9), created 100 s
    ago, and a running run: torn down with its queue afterwards."""
    model = f"exp-{uuid.uuid4().hex[:6]}"
    sessions = sessions_with_model(stack, model)
    job_ids = [uuid.uuid4() for _ in range(4)]
    run_id = uuid.uuid4()
    with sessions.begin() as session:
        records = [
            ListingRecord(f"{model}-{i}", "t", None, None, ["http://x/a.jpg"]) for i in range(4)
        ]
        listings.upsert_listings(session, records)
        jobs.create_jobs(
            session, [NewJob(j, r.listing_id, model) for j, r in zip(job_ids, records, strict=True)]
        )
        session.execute(
            text("UPDATE jobs SET created_at = now() - interval '100 seconds' WHERE model_id = :m"),
            {"m": model},
        )
        session.execute(
            text(
                "INSERT INTO runs (run_id, kind, model_id, status, total, done, failed) "
                "VALUES (:r, 'reindex', :m, 'running', 10, 3, 1)"
            ),
            {"r": run_id, "m": model},
        )
    app = make_celery(settings_from(worker_env))
    send_analysis(app, job_ids[:3], model)
    app.send_task(
        ANALYZE_TASK,
        kwargs=AnalyzeMessage(job_ids[3]).kwargs(),
        queue=f"lv.{model}",
        task_id=str(job_ids[3]),
        priority=9,
    )
    client = redis.Redis.from_url(stack.broker_url)
    try:
        yield model
    finally:
        client.delete(*queue_keys(model))
        with stack.engine.begin() as connection:
            connection.execute(text("DELETE FROM runs WHERE run_id = :r"), {"r": run_id})
            connection.execute(
                text("DELETE FROM listings WHERE listing_id LIKE :p"), {"p": f"{model}-%"}
            )


def test_the_exporter_reports_queue_depth_backlog_and_run_progress(
    stack: Stack, worker_env: dict[str, str], backlog: str, tmp_path: Path
) -> None:
    model = backlog
    client = redis.Redis.from_url(stack.broker_url)
    assert client.llen(f"lv.{model}") == 3  # the fourth sits in kombu's priority-9 list
    port, log = free_port(), tmp_path / "exporter.log"
    exporter = start_exporter(worker_env, port, log)
    try:
        metrics = scrape(port, log)
    finally:
        assert stop(exporter) == 0, log.read_text()

    labels = (("model", model), ("queue", f"lv.{model}"))
    assert metrics[("lv_queue_messages", labels)] == 4
    assert metrics[("lv_jobs_unfinished", (("model", model), ("state", "queued")))] == 4
    assert metrics[("lv_jobs_unfinished", (("model", model), ("state", "running")))] == 0
    assert metrics[("lv_job_oldest_queued_age_seconds", (("model", model),))] >= 100
    assert ("lv_broker_unacked_messages", ()) in metrics
    found = {
        name: value
        for (name, pairs), value in metrics.items()
        if name.startswith("lv_run_") and ("model", model) in pairs
    }
    assert found == {
        "lv_run_size_listings": 10,
        "lv_run_done_listings": 3,
        "lv_run_failed_listings": 1,
        "lv_run_progress_ratio": 0.4,
    }
    assert metrics[("lv_exporter_source_up", (("source", "broker"),))] == 1
    assert metrics[("lv_exporter_source_up", (("source", "database"),))] == 1
    # What the exporter declares (and the deployment files are checked against) is what it
    # serves.
    assert {name for name, _ in metrics} == set(METRICS)


def test_with_the_broker_down_the_exporter_still_answers_and_says_so(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**worker_env, "LV_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    port, log = free_port(), tmp_path / "exporter.log"
    exporter = start_exporter(env, port, log)
    try:
        metrics = scrape(port, log)
    finally:
        stop(exporter)
    assert metrics[("lv_exporter_source_up", (("source", "broker"),))] == 0
    assert metrics[("lv_exporter_source_up", (("source", "database"),))] == 1
    assert not [key for key in metrics if key[0] == "lv_queue_messages"]
    assert any(key[0] == "lv_jobs_unfinished" for key in metrics)


def test_a_port_in_use_is_a_clear_error(worker_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        answer = subprocess.run(
            [sys.executable, "-m", "listing_vision", "exporter", "--host=127.0.0.1"],
            env={**worker_env, "LV_EXPORTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert answer.returncode == 2
    assert f"exporter cannot listen on 127.0.0.1:{port}" in answer.stderr
