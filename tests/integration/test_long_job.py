"""Fault 5 of issue 14: a job that would run longer than the visibility timeout is not run
twice at once (nor twice to completion).

The broker delivers a message again once it has been unacknowledged for the visibility timeout,
to any worker that looks (a worker scans for such messages when it starts). Here the image host
holds the job's first fetch open for far longer than that timeout; a second worker starts once
the timeout has passed. The attempt must give up at its own time limit (LV_TASK_TIME_LIMIT,
below the visibility timeout), so no second delivery ever finds a live attempt: the host never
sees two requests of the job at once, and the job succeeds once, on its retry.
"""

from __future__ import annotations

import http.server
import itertools
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.integration.conftest import Stack, query, start_worker, stop_worker
from tests.integration.fault_helpers import MODEL, assert_one_row_each

pytestmark = pytest.mark.slow
VISIBILITY = 5
HOLD = 30.0  # seconds the first request is held open: far past the visibility timeout


def hung_up(connection: socket.socket, wait: float) -> bool:
    """Whether the client closed its end within `wait` seconds (noticed at once, not at the
    next write): the moment an attempt gives up."""
    readable, _, _ = select.select([connection], [], [], wait)
    return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""


@dataclass
class SlowFirstHost:
    """Serves one JPEG; the first request gets its bytes a few at a time over HOLD seconds."""

    body: bytes
    # (started, ended, completed) per request, monotonic seconds
    requests: list[tuple[float, float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        with self.lock:
            first = not self.requests
            self.requests.append((started, started, False))
            index = len(self.requests) - 1
        completed = False
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.send_header("Content-Length", str(len(self.body)))
            handler.end_headers()
            if first:
                pieces = 60
                step = max(1, len(self.body) // pieces)
                for offset in range(0, len(self.body) - step, step):
                    handler.wfile.write(self.body[offset : offset + step])
                    handler.wfile.flush()
                    if self.stop.is_set() or hung_up(handler.connection, HOLD / pieces):
                        return
                handler.wfile.write(self.body[offset + step :])
            else:
                handler.wfile.write(self.body)
            handler.wfile.flush()
            completed = True
        except OSError:
            pass  # the client hung up
        finally:
            with self.lock:
                self.requests[index] = (started, time.monotonic(), completed)

    def overlapping(self) -> bool:
        spans = sorted(self.requests)
        return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


@pytest.fixture
def slow_host(image_root: Path) -> Iterator[tuple[str, SlowFirstHost]]:
    path = images.save(images.product_image("teal", "circle", (300, 300)), image_root / "s.jpg")
    host = SlowFirstHost(path.read_bytes())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            host.serve(self)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/s.jpg", host
    host.stop.set()
    server.shutdown()
    server.server_close()


def test_a_job_held_past_the_visibility_timeout_is_not_run_twice(
    stack: Stack,
    worker_env: dict[str, str],
    producer: Any,
    slow_host: tuple[str, SlowFirstHost],
    tmp_path: Path,
) -> None:
    url, host = slow_host
    env = {
        **worker_env,
        "LV_VISIBILITY_TIMEOUT": str(VISIBILITY),
        "LV_TASK_TIME_LIMIT": "3",
        "LV_FETCH_TIMEOUT": "60",  # the host's own deadline would allow the whole slow answer
        "LV_MAX_ATTEMPTS": "3",
    }
    prefix = f"long-{uuid.uuid4().hex[:6]}"
    first = start_worker(stack, env, tmp_path / "first.log", model=MODEL)
    second = None
    try:
        report = producer.enqueue(
            [{"listing_id": f"{prefix}-0", "title": "a teal lamp", "image_url": url}], model=MODEL
        )
        deadline = time.monotonic() + 60
        while not host.requests:
            assert time.monotonic() < deadline, first.log()[-3000:]
            time.sleep(0.05)
        # Past the visibility timeout, a second worker starts: its start-up scan gives back
        # any message unacknowledged for that long, to itself.
        time.sleep(VISIBILITY + 1)
        second = start_worker(stack, env, tmp_path / "second.log", model=MODEL)
        counts = producer.wait(report.job_ids, timeout=120, poll_interval=0.3)
    finally:
        for worker in (first, second):
            if worker is not None:
                stop_worker(worker)
    logs = first.log() + (second.log() if second else "")

    assert counts["succeeded"] == 1, (counts, logs[-4000:])
    assert not host.overlapping(), host.requests  # never two attempts at once
    started, ended, completed = sorted(host.requests)[0]
    assert not completed and ended - started < HOLD - 5, host.requests  # given up, not waited out
    job = query(stack, "SELECT attempts FROM jobs WHERE job_id = :j", j=report.job_ids[0])[0]
    assert job["attempts"] == 2, job  # the cut attempt, then its retry
    assert "superseded" not in logs
    assert_one_row_each(stack, prefix, 1)
