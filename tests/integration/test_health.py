"""`listing-vision health` against the real stack: what it checks, and that it names a stalled
model and an unreachable broker (exit 1), not just a worker that answers ping."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid

import pytest

from contract.registry import get_spec, load_registry
from db import jobs, listings, registered_models
from db.engine import make_sessions
from db.jobs import NewJob
from db.records import ListingRecord
from tests.integration.conftest import Stack, WorkerProcess, free_port, together

pytestmark = pytest.mark.slow


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listing_vision", "health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_health_reports_each_part_and_names_a_stalled_model(
    stack: Stack, worker: WorkerProcess, worker_env: dict[str, str]
) -> None:
    answer = health(worker_env, "--json", "--stall", "3600")
    report = json.loads(answer.stdout)
    assert report["broker"] == "ok" and report["database"] == "ok"
    assert report["schema"] == "current" and report["active_model"] == "tiny"
    assert any(name.startswith("tiny.cpu@") for name in report["workers"])
    assert not any("tiny " in problem for problem in report["problems"])

    # Work for a model no worker holds, waiting: with a short stall window it is named.
    sessions = make_sessions(stack.engine)
    listing_id = f"health-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        registered_models.ensure_model(session, get_spec(load_registry(), "lv-toy"))
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "t", None, None, ["http://x/a.jpg"])]
        )
        jobs.create_jobs(session, [NewJob(uuid.uuid4(), listing_id, "lv-toy")])
    try:
        stalled = health(worker_env, "--stall", "0")
    finally:
        with stack.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM listings WHERE listing_id = %s", (listing_id,))
    assert stalled.returncode == 1, stalled.stdout + stalled.stderr
    assert "progress: model lv-toy" in stalled.stdout
    assert "no live worker holds it" in stalled.stdout


def test_health_names_an_unreachable_broker(worker_env: dict[str, str]) -> None:
    env = {**worker_env, "LV_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    answer = health(env)
    assert answer.returncode == 1
    assert "broker: cannot connect" in answer.stdout


def test_a_probe_asks_about_its_own_model_and_host(
    stack: Stack, worker: WorkerProcess, worker_env: dict[str, str]
) -> None:
    """What compose and Kubernetes run in a worker's container: `--model M --here`."""
    own = health(worker_env, "--json", "--model", "tiny", "--here", "--stall", "3600")
    assert own.returncode == 0, own.stdout + own.stderr
    report = json.loads(own.stdout)
    assert all(name.endswith(f"@{socket.gethostname()}") for name in report["workers"])

    # Work for another model, stalled, is not this probe's business...
    sessions = make_sessions(stack.engine)
    listing_id = f"probe-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        registered_models.ensure_model(session, get_spec(load_registry(), "lv-toy"))
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "t", None, None, ["http://x/a.jpg"])]
        )
        jobs.create_jobs(session, [NewJob(uuid.uuid4(), listing_id, "lv-toy")])
    try:
        tiny, toy, beat_like = together(
            lambda: health(worker_env, "--model", "tiny", "--here", "--stall", "0"),
            lambda: health(worker_env, "--model", "lv-toy", "--here", "--stall", "0"),
            lambda: health(worker_env, "--here", "--stall", "0"),
        )
    finally:
        with stack.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM listings WHERE listing_id = %s", (listing_id,))
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    # ...but it is the business of a probe of that model, which no worker here holds.
    assert toy.returncode == 1
    assert "workers: no live worker on this host holds model lv-toy" in toy.stdout
    assert "progress: model lv-toy" in toy.stdout
    assert beat_like.returncode == 0, beat_like.stdout  # a process on this host answers


def test_a_probe_on_a_host_without_workers_fails(worker_env: dict[str, str]) -> None:
    answer = subprocess.run(
        [
            sys.executable,
            "-c",
            "import socket, sys; socket.gethostname = lambda: 'elsewhere'; "
            "sys.argv = ['listing-vision', 'health', '--here']; "
            "from listing_vision.cli import main; main()",
        ],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "workers: none answers on this host (elsewhere)" in answer.stdout
