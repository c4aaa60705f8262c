"""Flower as an operator sees it: a real headless Chromium (Debian's `chromium`) against the
Flower that `listing-vision up` serves with credentials. Screenshots are saved as artifacts
(in TEST_ARTIFACTS_DIR when set, else the test's tmp_path)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import images
from tests.browser import CHROMIUM, Chromium
from tests.integration.conftest import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium not installed (Debian package `chromium`; .ci/run installs it)",
    ),
]
USER, PASSWORD = "ops", "s3cret-pass"
SECRET = "deadbeefsignature"


@dataclass
class Stack:
    env: dict[str, str]
    flower: str
    log: Path
    home: Path


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # 401: it answers
    except OSError:
        return False


def _wait_for(predicate, what: str, log: Path, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, models_file: Path, image_root: Path
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("flower-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LV_")}
    port = free_port()
    env.update(
        LV_HOME=str(home),
        LV_MODELS_FILE=str(models_file),
        LV_MODEL="tiny",
        LV_FILE_ROOTS=str(image_root),
        LV_ALLOWED_PRIVATE_NETWORKS="127.0.0.0/8",
        LV_FLOWER_PORT=str(port),
        LV_FLOWER_USER=USER,
        LV_FLOWER_PASSWORD=PASSWORD,
        LV_EXPORTER_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    log = home / "up-console.log"
    with open(log, "wb") as output:
        up = subprocess.Popen(
            [sys.executable, "-m", "listing_vision", "up"], env=env, stdout=output, stderr=output
        )
    try:
        flower = f"http://127.0.0.1:{port}"
        worker_log = home / "logs" / "worker-tiny.log"
        _wait_for(lambda: worker_log.exists() and "ready." in worker_log.read_text(), "worker", log)
        _wait_for(lambda: _answers(flower + "/healthcheck"), "Flower", log)
        yield Stack(env, flower, log, home)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(120)


def enqueue(stack: Stack, events: list[dict[str, str]], *args: str) -> int:
    """`listing-vision enqueue`, one message per job (LV_ENQUEUE_GROUP=1): what is checked
    here is Flower's view and control of each job as its own task."""
    answer = subprocess.run(
        [sys.executable, "-m", "listing_vision", "enqueue", "-", *args],
        input="\n".join(json.dumps(event) for event in events),
        env={**stack.env, "LV_ENQUEUE_GROUP": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    return answer.returncode


def test_flower_shows_workers_failed_listings_and_queues_behind_its_login(
    stack: Stack, image_root: Path, image_server: str, tmp_path: Path
) -> None:
    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path)) / "flower"
    good = images.save(images.product_image("red"), image_root / "flower-red.jpg")
    signed = f"{image_server}/flower-missing.jpg?X-Amz-Signature={SECRET}&token=t0k3n{SECRET}"

    async def scenario() -> None:
        async with Chromium(tmp_path / "profile", artifacts) as browser:
            login = (USER, PASSWORD)
            # Refused without credentials: pages, the API and Flower's own /metrics.
            for path in ("/", "/api/workers", "/api/tasks", "/metrics"):
                page = await browser.visit(stack.flower + path, screenshot="refused.png")
                assert page.status == 401, (path, page)
            assert "Access denied" in page.text
            wrong = await browser.visit(stack.flower + "/", credentials=(USER, "wrong"))
            assert wrong.status == 401

            # The worker, named with its model, online (before any job, so Flower sees them).
            workers = await browser.reload_until(
                stack.flower + "/workers",
                r"tiny\.cpu@",
                60,
                credentials=login,
                screenshot="workers.png",
            )
            assert workers.status == 200
            assert re.search(r"tiny\.cpu@\S+", workers.text), workers.text

            events = [
                {"listing_id": "fl-ok", "title": "red thing", "image_url": good.as_uri()},
                {"listing_id": "fl-bad", "title": "gone", "image_url": signed},
            ]
            assert enqueue(stack, events, "--wait", "--timeout", "180") == 1  # one failed

            # The worker's processed tasks: 2, of which 1 failed (active, processed, failed,
            # succeeded), as the jobs table says.
            counted = r"tiny\.cpu@\S+\s+Online\s+0\s+2\s+1\s+1\b"
            after = await browser.reload_until(
                stack.flower + "/workers",
                counted,
                60,
                credentials=login,
                screenshot="workers-after.png",
            )
            assert re.search(counted, after.text), after.text

            # The failed listing is a failed task, its error readable and its secrets gone.
            tasks = await browser.reload_until(
                stack.flower + "/tasks", "FAILURE", 60, credentials=login, screenshot="tasks.png"
            )
            assert "FAILURE" in tasks.text and "SUCCESS" in tasks.text, tasks.text
            failed_id = _failed_task_id(stack)
            task = await browser.visit(
                f"{stack.flower}/task/{failed_id}",
                credentials=login,
                until="HTTP 404",
                screenshot="task-failed.png",
            )
            assert "FAILURE" in task.text, task.text
            assert "HTTP 404 from host 127.0.0.1" in task.text, task.text
            assert "flower-missing.jpg?X-Amz-Signature=…&token=…" in task.text, task.text
            assert SECRET not in task.text

            # Queue lengths per model queue: work for a model nobody serves shows as waiting,
            # beside the live worker's queue (Flower learns a worker's queues when its workers
            # page is refreshed, as its Refresh button does).
            await browser.visit(stack.flower + "/workers?refresh=1", credentials=login)
            waiting = [
                {"listing_id": f"fl-wait-{i}", "title": "t", "image_url": good.as_uri()}
                for i in range(3)
            ]
            assert enqueue(stack, waiting, "--model", "tiny-batch") == 0
            broker = await browser.reload_until(
                stack.flower + "/broker",
                r"lv\.tiny-batch\s+3\b",
                60,
                credentials=login,
                screenshot="broker.png",
            )
            assert re.search(r"lv\.tiny-batch\s+3\b", broker.text), broker.text
            assert re.search(r"lv\.tiny\s+0\b", broker.text), broker.text
            broker_password = stack.env.get("LV_BROKER_URL") or _embedded_broker_password(stack)
            assert broker_password not in broker.text

            metrics = await browser.visit(stack.flower + "/metrics", credentials=login)
            assert metrics.status == 200 and "flower_" in metrics.text

    asyncio.run(scenario())


def _failed_task_id(stack: Stack) -> str:
    """The failed listing's job id (its task id), from the database as an operator would."""
    from sqlalchemy import text

    from db.engine import make_engine
    from listing_vision.embedded import running_urls

    url = running_urls(stack.home).database_url
    assert url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return str(
                connection.execute(
                    text("SELECT job_id FROM jobs WHERE listing_id = 'fl-bad'")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def _embedded_broker_password(stack: Stack) -> str:
    state = json.loads((stack.home / "embedded.json").read_text())
    return str(state["valkey"]["password"])


def _flower_post(stack: Stack, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
    """POST to Flower's API as its buttons do, with the operator's credentials."""
    import base64
    import urllib.parse

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        stack.flower + path,
        data=urllib.parse.urlencode(form or {}).encode(),
        headers={"Authorization": f"Basic {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _jobs(stack: Stack, prefix: str) -> dict[str, tuple[str, str, str | None]]:
    """listing id -> (job id, status, error) of the jobs whose listing id starts with prefix."""
    from sqlalchemy import text

    from db.engine import make_engine
    from listing_vision.embedded import running_urls

    url = running_urls(stack.home).database_url
    assert url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT listing_id, job_id, status, error FROM jobs WHERE listing_id LIKE :p"),
                {"p": prefix + "%"},
            ).all()
    finally:
        engine.dispose()
    return {row[0]: (str(row[1]), row[2], row[3]) for row in rows}


def test_rate_limits_and_revoke_work_from_flower(stack: Stack, image_root: Path) -> None:
    """The operator's controls in Flower's API (what its buttons post): a rate limit holds the
    model's tasks back, and a task revoked while it waits ends failed with its row."""
    worker = _worker_name(stack)
    good = images.save(images.product_image("blue"), image_root / "flower-ctl.jpg")
    limit = "/api/task/rate-limit/lv.analyze"
    assert _flower_post(stack, limit, {"ratelimit": "12/m"})[0] == 400  # which worker?
    status, body = _flower_post(stack, limit, {"workername": worker, "ratelimit": "12/m"})
    assert status == 200 and "rate limit set successfully" in body.lower(), body
    try:
        events = [
            {"listing_id": f"fl-ctl-{i}", "title": "blue thing", "image_url": good.as_uri()}
            for i in range(3)
        ]
        assert enqueue(stack, events) == 0
        # 12 a minute: the first runs at once, the others wait in the worker's bucket (5 s each)
        _wait_for(lambda: _done(stack, "fl-ctl-") >= 1, "a first job", stack.log, 60)
        queued = _jobs(stack, "fl-ctl-")
        assert sum(status == "succeeded" for _, status, _ in queued.values()) == 1, queued
        waiting = [job for job, status, _ in queued.values() if status == "queued"]
        assert waiting, queued
        status, body = _flower_post(stack, f"/api/task/revoke/{waiting[-1]}")
        assert status == 200 and "revok" in body.lower(), body

        _wait_for(lambda: _done(stack, "fl-ctl-") == 3, "all three jobs", stack.log, 120)
    finally:
        _flower_post(stack, limit, {"workername": worker, "ratelimit": "0"})
    final = _jobs(stack, "fl-ctl-")
    revoked = [v for v in final.values() if v[0] == waiting[-1]]
    assert revoked == [(waiting[-1], "failed", "revoked by an operator")], final
    assert sum(status == "succeeded" for _, status, _ in final.values()) == 2, final
    first, second = _started(stack, "fl-ctl-")
    assert second - first >= 4, (first, second)  # the second waited for its turn in the bucket


def _started(stack: Stack, prefix: str) -> list[float]:
    """When each succeeded job's attempt started (epoch seconds, in order)."""
    from sqlalchemy import text

    from db.engine import make_engine
    from listing_vision.embedded import running_urls

    url = running_urls(stack.home).database_url
    assert url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(
                connection.execute(
                    text(
                        "SELECT extract(epoch FROM started_at)::float FROM jobs "
                        "WHERE listing_id LIKE :p AND status = 'succeeded' ORDER BY started_at"
                    ),
                    {"p": prefix + "%"},
                ).scalars()
            )
    finally:
        engine.dispose()


def _done(stack: Stack, prefix: str) -> int:
    return sum(status in ("succeeded", "failed") for _, status, _ in _jobs(stack, prefix).values())


def _worker_name(stack: Stack) -> str:
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        stack.flower + "/api/workers?refresh=1", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        names = [name for name in json.loads(answer.read()) if name.startswith("tiny.")]
    assert names, "no tiny worker in Flower"
    return names[0]
