"""Celery's own tools reach the stack through `listing_vision.celery_app` (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.integration.conftest import WorkerProcess, together

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


def test_workers_prints_each_workers_batching_figures(
    worker: WorkerProcess, worker_env: dict[str, str], producer: Any, image_root: Path
) -> None:
    def figures_now() -> dict[str, Any]:
        shown = run(worker_env, "-m", "listing_vision", "workers", "--json", "--timeout", "2")
        assert shown.returncode == 0, shown.stderr
        return dict(next(iter(json.loads(shown.stdout).values())))

    before = figures_now()  # the session's worker may have served other tests' jobs already
    image = images.save(images.product_image("plum"), image_root / "workers-cmd.jpg")
    report = producer.enqueue(
        [
            {"listing_id": f"workers-{i}", "title": "a plum mug", "image_url": image.as_uri()}
            for i in range(3)
        ],
        model="tiny",
    )
    assert producer.wait(report.job_ids, timeout=60, poll_interval=0.2)["succeeded"] == 3

    # The session's worker answers within milliseconds; the default wait for replies is 5 s.
    shown, after = together(
        lambda: run(worker_env, "-m", "listing_vision", "workers", "--timeout", "2"),
        figures_now,
    )

    assert shown.returncode == 0, shown.stderr
    assert "tiny.cpu@" in shown.stdout and "model tiny on cpu" in shown.stdout
    assert after["model"] == "tiny"
    # Three listings with one image and one title: a group asks the model for them once (its
    # requests are deduplicated), so at least one request, one image call and one image.
    grew = {key: after[key] - before[key] for key in ("jobs_batched", "image_calls", "images")}
    assert all(value >= 1 for value in grew.values()), (before, after)
    assert after["images_per_call"] == round(after["images"] / after["image_calls"], 1)


def test_workers_without_any_worker_says_so_and_fails(tmp_path: Path) -> None:
    import os

    from listing_vision.embedded import EmbeddedServers

    home = tmp_path / "home"
    with EmbeddedServers(home):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
        env["LV_HOME"] = str(home)
        shown = run(env, "-m", "listing_vision", "workers", "--timeout", "1")
    assert shown.returncode == 1 and "no worker answered" in shown.stdout


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
