"""Celery's own tools reach the stack through `listing_vision.celery_app` (issue 15)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import WorkerProcess

pytestmark = pytest.mark.slow


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120
    )


def test_celery_inspect_reaches_the_workers_including_lv_stats(
    worker: WorkerProcess, worker_env: dict[str, str]
) -> None:
    ping = run(worker_env, "-m", "celery", "-A", "listing_vision.celery_app", "inspect", "ping")
    assert ping.returncode == 0, ping.stderr
    assert "tiny.cpu@" in ping.stdout and "pong" in ping.stdout

    stats = run(
        worker_env, "-m", "celery", "-A", "listing_vision.celery_app", "inspect", "lv_stats"
    )
    assert stats.returncode == 0, stats.stderr
    assert "model_calls" in stats.stdout and "not recognized" not in stats.stdout + stats.stderr


def test_urls_prints_where_the_stack_is(worker_env: dict[str, str]) -> None:
    shown = run(worker_env, "-m", "listing_vision", "urls")
    assert shown.returncode == 0, shown.stderr
    assert worker_env["LV_DATABASE_URL"] in shown.stdout
    assert worker_env["LV_BROKER_URL"] in shown.stdout
    assert "celery -A listing_vision.celery_app" in shown.stdout


def test_without_a_broker_the_celery_app_says_what_to_do(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    env["LV_HOME"] = str(tmp_path)  # no stack runs here, and none may be started
    answer = run(env, "-c", "import listing_vision.celery_app")
    assert answer.returncode != 0
    assert "no broker: set LV_BROKER_URL, or start the stack with `listing-vision up`" in (
        answer.stderr
    )
    assert not (tmp_path / "postgres").exists()
