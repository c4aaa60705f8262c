"""Helpers of the fault-injection tests (issue 14): a catalogue of distinct images, a run under
way, a worker kept running as `up` keeps it, and the invariant every fault test asserts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests import images
from tests.integration.conftest import Stack, WorkerProcess, query, start_worker, stop_worker

MODEL = "tiny-batch"  # its own queue: the session's worker (model "tiny") never sees these
# A job's attempt here takes well under a second; a worker starts in 4 to 8 s. With a visibility
# timeout of 5 s a replacement's start-up scan usually finds a dead worker's messages already
# due, and the reconciler re-sends what it does not within 2 x 5 + 3 = 13 s.
SHORT = {"LV_VISIBILITY_TIMEOUT": "5", "LV_TASK_TIME_LIMIT": "3", "LV_MAX_ATTEMPTS": "3"}
TERMINAL = ("succeeded", "failed", "dead")


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


def assert_each_job_ended_once(
    stack: Stack, job_ids: Sequence[uuid.UUID], prefix: str, max_attempts: int = 3
) -> None:
    jobs = query(
        stack, "SELECT status, attempts FROM jobs WHERE job_id = ANY(:ids)", ids=list(job_ids)
    )
    assert len(jobs) == len(job_ids)
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    assert all(1 <= job["attempts"] <= max_attempts for job in jobs), jobs
    assert_one_row_each(stack, prefix, len(job_ids))


def assert_one_row_each(stack: Stack, prefix: str, listings: int, model: str = MODEL) -> None:
    rows = query(
        stack,
        "SELECT listing_id, count(*) AS n FROM results WHERE model_id = :m "
        "AND listing_id LIKE :p GROUP BY listing_id",
        m=model,
        p=f"{prefix}-%",
    )
    assert len(rows) == listings and all(row["n"] == 1 for row in rows), rows


class Supervisor:
    """One worker kept running as `up` keeps it: one that dies is started again at once.
    `deaths` holds the exit status of each worker that died (a SIGKILL is -9)."""

    def __init__(self, env: dict[str, str], log_dir: Path, model: str = MODEL) -> None:
        self.env = env
        self.log_dir = log_dir
        self.model = model
        self.deaths: list[int] = []
        self.logs: list[Path] = []
        self.process: subprocess.Popen[bytes] | None = None

    def keep_running(self) -> None:
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return
            self.deaths.append(code)
        log = self.log_dir / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "listing_vision", "worker", "--model", self.model],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, chars: int = 3000) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def supervised(env: dict[str, str], log_dir: Path, model: str = MODEL) -> Iterator[Supervisor]:
    supervisor = Supervisor(env, log_dir, model)
    try:
        yield supervisor
    finally:
        supervisor.stop()


def wait_supervised(
    producer: Any, job_ids: Sequence[uuid.UUID], supervisor: Supervisor, timeout: float
) -> dict[str, int]:
    """Until every job is terminal, restarting the worker whenever it dies."""
    deadline = time.monotonic() + timeout
    while True:
        supervisor.keep_running()
        counts = producer.wait(job_ids, timeout=0)
        if sum(counts[state] for state in TERMINAL) == len(job_ids):
            return dict(counts)
        assert time.monotonic() < deadline, (dict(counts), supervisor.log_tail())
        time.sleep(0.3)


@contextmanager
def postgres_stopped(stack: Stack) -> Iterator[None]:
    """The embedded PostgreSQL stopped ("fast": connections cut, transactions rolled back) for
    the duration of the block, then started again on the same data and socket, as a restart of
    the database host would."""
    from pgserver._commands import pg_ctl
    from pgserver.utils import PostmasterInfo

    pgdata = stack.home / "postgres"
    info = PostmasterInfo.read_from_pgdata(pgdata)
    assert info is not None and info.socket_dir is not None
    user = "pgserver" if os.geteuid() == 0 else None  # pgserver's own user when run as root
    pg_ctl(["-m", "fast", "-w", "stop"], pgdata=pgdata, user=user, timeout=60)
    try:
        yield
    finally:
        start = ["-w", "-o", '-h ""', "-o", f"-k {info.socket_dir}", "-l", str(pgdata / "log")]
        pg_ctl([*start, "start"], pgdata=pgdata, user=user, timeout=60)
