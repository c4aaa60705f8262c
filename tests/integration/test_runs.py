"""Runs on the embedded stack with tiny models: rescoring and reindexing the whole catalogue.

The module has a database and a broker database of its own, so the catalogue's size is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from contract.broker import STATS_COMMAND, model_queue, send_chunks
from db.embedding_index import index_name, index_state
from db.engine import make_sessions
from producer.enqueue import Producer
from producer.runs import RunProducer
from tests import images
from tests.integration.conftest import (
    Stack,
    WorkerProcess,
    lv_environment,
    own_servers,
    running_workers,
    settings_from,
)
from tests.tiny_models import save_tiny_open_clip
from worker.main import worker_name
from worker.reconciler import Lateness, Reconciler

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

    @contextlib.contextmanager
    def worker(self, model: str = "tiny", **env: str) -> Iterator[WorkerProcess]:
        with self.workers(model, **env) as (process,):
            yield process

    def workers(self, *models: str, **env: str) -> AbstractContextManager[list[WorkerProcess]]:
        """One worker per model, started together."""
        return running_workers(self.env, self.tmp, *models, **env)

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


@pytest.fixture(scope="module")
def catalogue(
    stack: Stack, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Catalogue]:
    tmp = tmp_path_factory.mktemp("runs")
    own = own_servers(stack, "lv_runs", broker_db=5)
    database_url, broker_url, engine = own.database_url, own.broker_url, own.engine
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


@pytest.mark.parametrize(
    ("decode_processes", "colour"), [("0", "magenta"), ("2", "orange")], ids=["threads", "pool"]
)
def test_refetch_re_embeds_only_the_image_whose_content_changed(
    catalogue: Catalogue, decode_processes: str, colour: str
) -> None:
    """`rescore --refetch` revalidates every image with a conditional request: the one whose
    file changed is fetched and embedded again, and only its listing's row is rewritten. The
    same with the fetches (conditional, over http) in a pool of decode processes."""
    changed = catalogue.root / "r-001.jpg"
    env = {
        "LV_DECODE_PROCESSES": decode_processes,
        "LV_POOL_FETCHES": "true",
        "LV_INPUT_PATH": "tensor",
    }
    with catalogue.worker(**env), catalogue.producer() as producer:
        runs = RunProducer(producer)
        catalogue.wait_run(runs.start_rescore(scope="all"))  # settles what earlier tests left
        seq = catalogue.query("SELECT max(change_seq) AS seq FROM results")[0]["seq"]
        before = _stats(producer, "tiny")
        images.save(images.product_image(colour, "triangle", (90, 70)), changed)
        later = time.time() + 5  # a newer Last-Modified, whatever the clock's resolution
        os.utime(changed, (later, later))
        run = catalogue.wait_run(runs.start_rescore(scope="all", refetch=True))
        after = _stats(producer, "tiny")
    assert run["status"] == "succeeded", run
    rewritten = catalogue.query(
        "SELECT listing_id FROM results WHERE model_id = 'tiny' AND change_seq > :s", s=seq
    )
    assert [row["listing_id"] for row in rewritten] == ["r-001"]
    stored = catalogue.query("SELECT sha256 FROM listing_images WHERE listing_id = 'r-001'")
    assert [row["sha256"] for row in stored] == [hashlib.sha256(changed.read_bytes()).hexdigest()]
    assert after["image_calls"] == before["image_calls"] + 1  # that one image, nothing else


def test_a_category_list_change_reaches_every_row_without_an_image_call(
    catalogue: Catalogue,
) -> None:
    labels = ["mug", "lamp", "spaceship", "teapot"]
    categories = catalogue.tmp / "categories.txt"
    categories.write_text("\n".join(labels) + "\n")
    with (
        catalogue.worker(LV_CATEGORIES_FILE=str(categories)),
        catalogue.producer() as producer,
    ):
        before = _stats(producer, "tiny")
        run = catalogue.wait_run(RunProducer(producer).start_rescore(scope="all"))
        after = _stats(producer, "tiny")
    rows = catalogue.query(
        "SELECT listing_id, top_category, categories, category_mismatch, status "
        "FROM model_results WHERE model_id = 'tiny'"
    )
    assert run["status"] == "succeeded" and run["done"] == LISTINGS - len(BAD)
    assert after["image_calls"] == before["image_calls"]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == LISTINGS - len(BAD)
    for row in ok:
        assert {c["label"] for c in row["categories"]} <= set(labels), row
        assert row["top_category"] in labels
        assert row["category_mismatch"] is not None  # every listing claims mug or lamp


def test_cancel_then_resume_finishes_the_rest_without_redoing_a_listing(
    catalogue: Catalogue,
) -> None:
    catalogue.server.delay = 0.3  # each chunk's conditional requests take a while
    try:
        with (
            catalogue.worker(LV_WORKER_CONCURRENCY="1"),
            catalogue.producer() as producer,
        ):
            runs = RunProducer(producer)
            run_id = runs.start_rescore(scope="all", refetch=True)
            _wait_for(lambda: catalogue.run(run_id)["done"] >= 1, "a first chunk")
            runs.cancel(run_id)
            _wait_for(lambda: not _open_chunks(catalogue, run_id, "running"), "running chunks")
            cancelled = catalogue.run(run_id)
            catalogue.server.delay = 0.0  # the cancel has landed mid-run: the rest may be quick
            runs.resume(run_id)
            resumed = catalogue.wait_run(run_id)
    finally:
        catalogue.server.delay = 0.0
    assert cancelled["status"] == "cancelled"
    assert 0 < cancelled["done"] + cancelled["failed"] < LISTINGS
    assert resumed["status"] == "succeeded"
    assert resumed["done"] + resumed["failed"] == resumed["total"] == LISTINGS
    once = _each_listing_once(catalogue, run_id)
    assert set(once) == set(catalogue.listing_ids) and set(once.values()) == {1}


def test_a_chunk_stops_fetching_at_the_time_limit_and_retries_the_rest(
    catalogue: Catalogue,
) -> None:
    """LV_TASK_TIME_LIMIT (5 s here) bounds a chunk's delivery as it bounds a job's attempt:
    16 listings at 1 s an image on two fetch threads would take about 9 s."""
    catalogue.server.delay = 1.0
    try:
        with (
            catalogue.worker(LV_WORKER_CONCURRENCY="1"),
            catalogue.producer() as producer,
        ):
            run_id = RunProducer(producer).start_rescore(scope="all", refetch=True)
            _wait_for(
                lambda: catalogue.query(
                    "SELECT 1 FROM run_chunks WHERE run_id = :r AND generation > 1", r=run_id
                ),
                "a chunk of listings the first could not fetch in time",
                timeout=60,
            )
            first = catalogue.query(
                "SELECT extract(epoch FROM finished_at - started_at) AS seconds, done, failed "
                "FROM run_chunks WHERE run_id = :r AND generation = 1 AND status = 'succeeded' "
                "ORDER BY finished_at LIMIT 1",
                r=run_id,
            )[0]
            catalogue.server.delay = 0.0
            run = catalogue.wait_run(run_id, timeout=180)
    finally:
        catalogue.server.delay = 0.0
    assert float(first["seconds"]) < 8.0, first  # the limit, the commit, a busy machine
    assert first["done"] + first["failed"] < CHUNK  # the rest went to the next generation
    assert run["status"] == "succeeded", run
    assert run["done"] + run["failed"] == run["total"] == LISTINGS


def test_a_worker_killed_mid_chunk_loses_and_duplicates_nothing(catalogue: Catalogue) -> None:
    catalogue.server.delay = 0.5
    try:
        with catalogue.producer() as producer:
            with catalogue.worker(LV_WORKER_CONCURRENCY="1") as doomed:
                run_id = RunProducer(producer).start_rescore(scope="all", refetch=True)
                _wait_for(lambda: _open_chunks(catalogue, run_id, "running"), "a running chunk")
                doomed.process.send_signal(signal.SIGKILL)
                doomed.process.wait()
            catalogue.server.delay = 0.0
            # A visibility timeout shorter than a worker's start (its chunks, unslowed, take
            # well under a second): the replacement's start-up scan finds the killed chunk's
            # message due at once, or its reconciler re-sends it after 2 x 4 + 3 s, not 2 x 12 + 5.
            with catalogue.worker(LV_VISIBILITY_TIMEOUT="4", LV_TASK_TIME_LIMIT="3"):
                run = catalogue.wait_run(run_id, timeout=180)
    finally:
        catalogue.server.delay = 0.0
    assert run["status"] == "succeeded", run
    assert run["done"] + run["failed"] == run["total"] == LISTINGS
    once = _each_listing_once(catalogue, run_id)
    assert set(once) == set(catalogue.listing_ids) and set(once.values()) == {1}
    split = catalogue.query(
        "SELECT count(*) AS n FROM run_chunks WHERE run_id = :r AND status = 'split'", r=run_id
    )
    assert split[0]["n"] >= 1  # the killed chunk was redelivered and split
    rows = catalogue.query("SELECT count(*) AS n FROM results WHERE model_id = 'tiny'")
    assert rows[0]["n"] == LISTINGS


def test_a_second_rescoring_run_is_refused_while_one_runs(catalogue: Catalogue) -> None:
    with catalogue.producer() as producer:
        runs = RunProducer(producer)
        first = runs.start_rescore(scope="all")  # no worker: it stays running
        try:
            cli = subprocess.run(
                [sys.executable, "-m", "listing_vision", "rescore", "--all"],
                env=catalogue.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            runs.cancel(first)
    assert cli.returncode == 2, cli.stderr
    assert "already running" in cli.stderr and str(first) in cli.stderr


def test_a_run_whose_messages_were_lost_is_noticed_and_sent_again(catalogue: Catalogue) -> None:
    queue = model_queue("tiny")
    broker = redis.Redis.from_url(catalogue.env["LV_BROKER_URL"])
    with catalogue.producer() as producer:
        run_id = RunProducer(producer).start_rescore(scope="all")  # no worker yet
        broker.delete(queue)  # the broker restarted empty: every chunk message is gone
        with producer.sessions.begin() as session:
            session.execute(
                text("UPDATE runs SET updated_at = now() - interval '1 hour' WHERE run_id = :r"),
                {"r": run_id},
            )
            session.execute(
                text(
                    "UPDATE run_chunks SET updated_at = now() - interval '1 hour' WHERE run_id = :r"
                ),
                {"r": run_id},
            )
        late = Lateness(timedelta(seconds=60), timedelta(minutes=10), timedelta(minutes=5))
        reconciler = Reconciler(
            producer.sessions,
            lambda jobs: None,
            lambda chunks, countdown: send_chunks(producer.celery, chunks, "tiny", countdown),
            "tiny",
            late,
        )
        resent = reconciler.run_once()
        assert resent == len(_open_chunks(catalogue, run_id, "queued")) > 0
        assert broker.llen(queue) == resent
        assert reconciler.run_once() == 0  # its run is not stalled any more (just re-sent)
        with catalogue.worker():
            run = catalogue.wait_run(run_id)
    assert run["status"] == "succeeded" and run["done"] + run["failed"] == LISTINGS


def test_reindex_switches_atomically_to_a_model_of_another_dimension_and_rolls_back(
    catalogue: Catalogue,
) -> None:
    poller = _Poller(catalogue.engine)
    with catalogue.workers("tiny", "tiny-wide"), catalogue.producer() as producer:
        runs = RunProducer(producer)
        poller.start()
        run_id = runs.start_reindex("tiny-wide")
        # Its worker created the index empty at start; the backfill runs without it.
        index_during_run = catalogue.query(
            "SELECT to_regclass(:n) IS NOT NULL AS built, status FROM runs WHERE run_id = :r",
            n=index_name("tiny-wide"),
            r=run_id,
        )[0]
        changed = producer.enqueue(
            [{"listing_id": "r-001", "title": "a changed title", "image_url": _url(catalogue)}]
        )
        run = catalogue.wait_run(run_id)
        seen_before_switch = poller.last_seq_for("tiny")
        _wait_for(lambda: poller.latest_model() == "tiny-wide", "the poller to see the switch")
        producer.wait(changed.job_ids, timeout=60)
        back = runs.rollback()
        _wait_for(lambda: poller.latest_model() == "tiny", "the poller to see the rollback")
        if back.catch_up is not None:
            catalogue.wait_run(back.catch_up)
        poller.stop()
    assert run["status"] == "succeeded" and run["done"] + run["failed"] == LISTINGS
    assert len(changed.job_ids) == 2  # a listing changed during the run: both models analyse it
    assert poller.gaps == [], poller.gaps[:3]  # every listing always had a row
    assert min(poller.switch_seqs("tiny-wide")) > seen_before_switch  # the switch reads as new
    dims = catalogue.query(
        "SELECT DISTINCT vector_dims(embedding) AS d FROM embeddings WHERE model_id = 'tiny-wide'"
    )
    assert [row["d"] for row in dims] == [48]
    assert not index_during_run["built"] or index_during_run["status"] == "succeeded"
    with make_sessions(catalogue.engine)() as session:
        assert index_state(session, "tiny-wide") == "valid"  # built before the switch
    wide = catalogue.query(
        "SELECT title FROM listings l JOIN model_results r USING (listing_id) "
        "WHERE r.model_id = 'tiny-wide' AND listing_id = 'r-001'"
    )
    assert wide == [{"title": "a changed title"}]
    active = catalogue.query("SELECT model_id, previous_model_id FROM active_model")
    assert active == [{"model_id": "tiny", "previous_model_id": "tiny-wide"}]


def test_beat_starts_the_scheduled_rescoring_run(catalogue: Catalogue) -> None:
    env = {**catalogue.env, "LV_RESCORE_SCHEDULE": "every 2"}
    log = open(catalogue.tmp / "beat.log", "wb")  # noqa: SIM115
    beat = subprocess.Popen(
        [sys.executable, "-m", "listing_vision", "beat"], env=env, stdout=log, stderr=log
    )
    started = time.monotonic()
    try:
        _wait_for(
            lambda: catalogue.query(
                "SELECT 1 FROM runs WHERE kind = 'rescore' AND started_at > "
                "now() - make_interval(secs => :s)",
                s=time.monotonic() - started,
            ),
            "beat's run",
            timeout=60,
        )
    finally:
        beat.terminate()
        beat.wait(30)
        log.close()
    run = catalogue.query(
        "SELECT run_id, scope FROM runs WHERE kind = 'rescore' ORDER BY started_at DESC LIMIT 1"
    )[0]
    assert run["scope"] == "all"
    with catalogue.producer() as producer:
        RunProducer(producer).cancel(run["run_id"])


# --- helpers ---------------------------------------------------------------------------------


def _url(catalogue: Catalogue) -> str:
    return f"http://127.0.0.1:{catalogue.server.server_address[1]}/r-001.jpg"


def _open_chunks(catalogue: Catalogue, run_id: uuid.UUID, status: str) -> list[dict[str, Any]]:
    return catalogue.query(
        "SELECT chunk_id FROM run_chunks WHERE run_id = :r AND status = :s", r=run_id, s=status
    )


def _wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"waited {timeout}s for {what}")


class _Poller:
    """The catalogue's poller: reads `listing_results` as it changes, remembering what it saw."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gaps: list[int] = []
        self.seen: list[tuple[str, int]] = []  # (model_id, change_seq) of every row read
        self._last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        with self.engine.connect() as connection:
            self._last = connection.scalar(text("SELECT max(change_seq) FROM results")) or 0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.engine.connect() as connection:
                count = connection.scalar(text("SELECT count(*) FROM listing_results"))
                rows = connection.execute(
                    text(
                        "SELECT model_id, change_seq FROM listing_results "
                        "WHERE change_seq > :last ORDER BY change_seq"
                    ),
                    {"last": self._last},
                ).all()
            if count != LISTINGS:
                self.gaps.append(int(count or 0))
            for model_id, seq in rows:
                self.seen.append((model_id, seq))
                self._last = max(self._last, seq)
            time.sleep(0.02)

    def latest_model(self) -> str | None:
        return self.seen[-1][0] if self.seen else None

    def last_seq_for(self, model_id: str) -> int:
        return max((seq for model, seq in self.seen if model == model_id), default=0)

    def switch_seqs(self, model_id: str) -> list[int]:
        return [seq for model, seq in self.seen if model == model_id]
