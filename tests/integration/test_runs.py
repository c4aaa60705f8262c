"""Runs on the embedded stack with tiny models: rescoring and reindexing the whole catalogue.

The module has a database and a broker database of its own, so the catalogue's size is exact.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, make_url, text

from contract.broker import STATS_COMMAND
from db.engine import make_engine, make_sessions
from db.migrate import upgrade
from producer.enqueue import Producer
from producer.runs import RunProducer
from tests import images
from tests.integration.conftest import (
    Stack,
    WorkerProcess,
    lv_environment,
    settings_from,
    start_worker,
    stop_worker,
)
from tests.tiny_models import save_tiny_open_clip
from worker.main import worker_name

pytestmark = pytest.mark.slow

LISTINGS = 120
BAD = {"r-007", "r-050", "r-093"}  # a truncated JPEG each: `failed` rows
CHUNK = 16


class _DelayHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the catalogue's images, each answer delayed by the server's `delay` (seconds)."""

    server: _DelayServer

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(self.server.delay)
        super().do_GET()


class _DelayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    delay = 0.0


@dataclass
class Catalogue:
    env: dict[str, str]
    engine: Engine
    root: Path
    server: _DelayServer
    tmp: Path
    listing_ids: list[str]

    def worker(
        self, model: str = "tiny", **env: str
    ) -> contextlib.AbstractContextManager[WorkerProcess]:
        return _worker(self, model, env)

    def producer(self) -> Producer:
        return Producer(settings_from(self.env))

    def query(self, sql: str, **params: object) -> list[dict[str, Any]]:
        with make_sessions(self.engine)() as session:
            return [dict(row) for row in session.execute(text(sql), params).mappings()]

    def run(self, run_id: uuid.UUID) -> dict[str, Any]:
        return self.query("SELECT * FROM runs WHERE run_id = :r", r=run_id)[0]

    def wait_run(self, run_id: uuid.UUID, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] not in ("pending", "running"):
                return run
            time.sleep(0.2)
        pytest.fail(f"run still {run['status']} after {timeout}s: {run}")


@contextlib.contextmanager
def _worker(catalogue: Catalogue, model: str, env: dict[str, str]) -> Iterator[WorkerProcess]:
    log = catalogue.tmp / f"worker-{model}-{uuid.uuid4().hex[:6]}.log"
    process = start_worker(None, {**catalogue.env, **env}, log, model=model)  # type: ignore[arg-type]
    try:
        yield process
    finally:
        stop_worker(process)


@pytest.fixture(scope="module")
def catalogue(
    stack: Stack, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Catalogue]:
    tmp = tmp_path_factory.mktemp("runs")
    name = f"lv_runs_{uuid.uuid4().hex[:8]}"
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    database_url = make_url(stack.database_url).set(database=name).render_as_string(False)
    broker_url = stack.broker_url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(broker_url).flushdb()
    engine = make_engine(database_url)
    upgrade(engine)
    root = tmp / "images"
    root.mkdir()
    registry = _registry(tmp, models_file)
    server = _DelayServer(("127.0.0.1", 0), _handler(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = lv_environment(
        stack,
        registry,
        root,
        LV_DATABASE_URL=database_url,
        LV_BROKER_URL=broker_url,
        LV_RUN_CHUNK_SIZE=str(CHUNK),
        LV_TASK_TIME_LIMIT="5",
        LV_VISIBILITY_TIMEOUT="12",
        LV_MAX_ATTEMPTS="3",
        LV_HOME=str(tmp / "home"),
    )
    catalogue = Catalogue(env, engine, root, server, tmp, [])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    events = _events(root, base)
    catalogue.listing_ids = [e["listing_id"] for e in events]
    with catalogue.worker(), catalogue.producer() as producer:
        report = producer.enqueue(events)
        counts = producer.wait(report.job_ids, timeout=120)
    assert counts["succeeded"] == LISTINGS - len(BAD) and counts["failed"] == len(BAD), counts
    yield catalogue
    server.shutdown()
    engine.dispose()


def _handler(root: Path) -> Any:
    def handler(*args: Any, **kwargs: Any) -> _DelayHandler:
        return _DelayHandler(*args, directory=str(root), **kwargs)

    return handler


def _registry(tmp: Path, models_file: Path) -> Path:
    """The session's models plus `tiny-wide`, a tiny model of another embedding dimension."""
    wide = save_tiny_open_clip(tmp / "tiny-wide", seed=3, embed_dim=48)
    path = tmp / "models.toml"
    path.write_text(
        models_file.read_text()
        + f'\n[models.tiny-wide]\nbackend = "open_clip"\nname = "local-dir:{wide}"\n'
        + "threshold = 0.1\n"
    )
    return path


def _events(root: Path, base: str) -> list[dict[str, Any]]:
    colours = ["red", "blue", "green", "gold", "purple", "teal", "black", "orange"]
    shapes = ["circle", "square", "triangle"]
    events = []
    for i in range(LISTINGS):
        listing_id = f"r-{i:03d}"
        path = root / f"{listing_id}.jpg"
        if listing_id in BAD:
            images.truncated_jpeg(path)
        else:
            colour, shape = colours[i % 8], shapes[i % 3]
            images.save(images.product_image(colour, shape, (64 + i % 40, 64)), path)
        urls = [f"{base}/{path.name}"]
        if i % 10 == 0 and listing_id not in BAD:
            urls.append(path.as_uri())  # the same content by another URL
        events.append(
            {
                "listing_id": listing_id,
                "title": f"{colours[i % 8]} {shapes[i % 3]}",
                "image_urls": urls,
                "category": "mug" if i % 2 else "lamp",
            }
        )
    return events


def _stats(producer: Producer, model: str) -> dict[str, Any]:
    name = worker_name(model, None)
    replies = producer.celery.control.broadcast(
        STATS_COMMAND, reply=True, destination=[name], timeout=10
    )
    assert replies, f"no reply from {name}"
    calls: dict[str, Any] = replies[0][name]["model_calls"]
    return calls


def _each_listing_once(catalogue: Catalogue, run_id: uuid.UUID) -> Counter[str]:
    """How many succeeded chunks of the run hold each listing (1 each: none redone or lost)."""
    rows = catalogue.query(
        "SELECT unnest(listing_ids) AS listing_id FROM run_chunks "
        "WHERE run_id = :r AND status = 'succeeded'",
        r=run_id,
    )
    return Counter(row["listing_id"] for row in rows)


def test_rescoring_an_unchanged_catalogue_calls_no_encoder_and_rewrites_nothing(
    catalogue: Catalogue,
) -> None:
    with catalogue.worker(), catalogue.producer() as producer:
        runs = RunProducer(producer)
        catalogue.wait_run(runs.start_rescore(scope="all"))  # settles what earlier tests left
        before = _stats(producer, "tiny")
        seq = catalogue.query("SELECT max(change_seq) AS seq FROM results")[0]["seq"]
        run_id = runs.start_rescore(scope="all")
        run = catalogue.wait_run(run_id)
        after = _stats(producer, "tiny")
    assert run["status"] == "succeeded", run
    assert (run["total"], run["done"], run["failed"]) == (LISTINGS, LISTINGS - len(BAD), len(BAD))
    assert after["image_calls"] == before["image_calls"]
    assert after["text_calls"] == before["text_calls"]
    assert catalogue.query("SELECT max(change_seq) AS seq FROM results")[0]["seq"] == seq
    assert set(_each_listing_once(catalogue, run_id).values()) == {1}
