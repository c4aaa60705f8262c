"""Fault 6 of issue 14: a listing whose image kills the worker process every time it is
decoded (a native decoder crash) ends `dead` after the attempt cap, with its row, and the
listings that were in flight with it finish: they are not dragged to their cap alongside it.

The crash is real (SIGKILL from inside the worker, mid-decode) and comes from a test-only
`sitecustomize` put on the worker's PYTHONPATH (tests/integration/crash_hook/); the test plays
`up`'s part of starting a worker again whenever one dies.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL.PngImagePlugin import PngInfo

from tests import images
from tests.integration.conftest import Stack, query
from tests.integration.fault_helpers import (
    MODEL,
    SHORT,
    assert_one_row_each,
    catalogue,
    supervised,
    wait_supervised,
)

pytestmark = pytest.mark.slow
HOOK = Path(__file__).with_name("crash_hook")


def crashing_png(path: Path) -> Path:
    info = PngInfo()
    info.add_text("lv-test", "crash")
    images.product_image("red", "circle").save(path, format="PNG", pnginfo=info)
    return path


def test_a_listing_that_kills_its_worker_every_time_ends_dead_and_the_others_finish(
    stack: Stack, worker_env: dict[str, str], producer: Any, image_root: Path, tmp_path: Path
) -> None:
    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    events = catalogue(image_root, prefix, 15)
    poison = crashing_png(image_root / f"{prefix}-poison.png")
    events.insert(
        7, {"listing_id": f"{prefix}-p", "title": "a red mug", "image_url": poison.as_uri()}
    )
    env = {**worker_env, **SHORT, "PYTHONPATH": str(HOOK)}
    report = producer.enqueue(events, model=MODEL)
    poison_job = report.job_ids[7]

    with supervised(env, tmp_path) as supervisor:
        counts = wait_supervised(producer, report.job_ids, supervisor, timeout=280)
        log = supervisor.log_tail()

    # The worker really died on each of the poison's attempts (killed, not a clean exit).
    assert supervisor.deaths.count(-9) >= 3, (supervisor.deaths, log)
    assert counts == {"succeeded": 15, "dead": 1}, (counts, log)
    poisoned = query(
        stack, "SELECT status, attempts, error FROM jobs WHERE job_id = :j", j=poison_job
    )[0]
    assert poisoned["status"] == "dead" and poisoned["attempts"] == 3, poisoned
    row = query(
        stack,
        "SELECT status, error FROM results WHERE model_id = :m AND listing_id = :l",
        m=MODEL,
        l=f"{prefix}-p",
    )
    assert len(row) == 1 and row[0]["status"] == "failed", row
    assert row[0]["error"].startswith("gave up after 3 attempts"), row
    # The others lost at most the attempt they were in when the poison first struck.
    others = query(
        stack,
        "SELECT job_id, attempts, error FROM jobs WHERE job_id = ANY(:ids)",
        ids=[j for j in report.job_ids if j != poison_job],
    )
    assert all(1 <= job["attempts"] <= 2 for job in others), (others, supervisor.log_tail(8000))
    assert_one_row_each(stack, prefix, 16)
