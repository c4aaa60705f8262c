"""The Milvus mirror against milvus-lite (a local directory), with real worker processes.

The module has a database, a broker database and two models of its own (`mir-a`, 32
dimensions, and `mir-b`, 48), so the session's workers never take its jobs and its counts are
exact. Workers get `LV_MILVUS_URI` as a path, as a user would write it, and serve it through
the CLI's shared milvus-lite server; the tests read Milvus through the same server.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from contract.broker import send_analysis
from db.embeddings import nearest_listings as pgvector_nearest
from db.engine import make_sessions
from db.milvus import ACTIVE_ALIAS, MilvusStore, collection_name
from db.mirror import listing_vectors, nearest_listings, stored_vectors
from db.records import ListingOutcome, ResultRecord
from listing_vision.embedded_milvus import EmbeddedMilvus
from producer.enqueue import Producer
from producer.runs import RunProducer
from tests import images
from tests.integration.conftest import (
    Stack,
    WorkerProcess,
    free_port,
    lv_environment,
    own_servers,
    running_workers,
    settings_from,
)
from tests.integration.test_metrics import scrape
from tests.tiny_models import save_tiny_open_clip
from worker.mirror import MirrorWriter

pytestmark = pytest.mark.slow

COLOURS = ["red", "blue", "green", "gold", "purple", "teal", "black", "orange"]
SHAPES = ["circle", "square", "triangle"]


@dataclass
class Mirror:
    env: dict[str, str]
    engine: Engine
    sessions: sessionmaker[Session]
    root: Path
    tmp: Path
    store: MilvusStore
    milvus_path: Path

    @contextlib.contextmanager
    def worker(self, model: str = "mir-a", **env: str) -> Iterator[WorkerProcess]:
        with self.workers(model, **env) as (process,):
            yield process

    def workers(self, *models: str, **env: str) -> AbstractContextManager[list[WorkerProcess]]:
        """One worker per model, started together."""
        return running_workers(self.env, self.tmp, *models, **env)

    def producer(self) -> Producer:
        return Producer(settings_from(self.env))

    def scalar(self, sql: str, **params: object) -> Any:
        with self.sessions() as session:
            return session.scalar(text(sql), params)

    def stored_shas(self, model: str) -> list[str]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    text("SELECT sha256 FROM embeddings WHERE model_id = :m ORDER BY sha256"),
                    {"m": model},
                )
            )

    def events(self, tag: str, count: int) -> list[dict[str, Any]]:
        """`count` listings with an image of their own each (new content for the model)."""
        out = []
        for i in range(count):
            path = self.root / f"{tag}-{i}.jpg"
            colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
            size = (64 + (i * 7) % 50, 64 + len(tag) % 9)
            images.save(images.product_image(colour, shape, size), path)
            out.append(
                {
                    "listing_id": f"{tag}-{i}",
                    "title": f"{colour} {shape}",
                    "image_url": path.as_uri(),
                }
            )
        return out

    def mirror_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "listing_vision", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )


@pytest.fixture(scope="module")
def mirror(
    stack: Stack, models_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mirror]:
    tmp = tmp_path_factory.mktemp("mirror")
    own = own_servers(stack, "lv_mirror", broker_db=11)
    database_url, broker_url, engine = own.database_url, own.broker_url, own.engine
    root = tmp / "images"
    root.mkdir()
    registry = tmp / "models.toml"
    narrow = save_tiny_open_clip(tmp / "mir-a", seed=1)
    wide = save_tiny_open_clip(tmp / "mir-b", seed=3, embed_dim=48)
    registry.write_text(
        f'[models.mir-a]\nbackend = "open_clip"\nname = "local-dir:{narrow}"\nthreshold = 0.1\n'
        f'[models.mir-b]\nbackend = "open_clip"\nname = "local-dir:{wide}"\nthreshold = 0.1\n'
    )
    milvus_path = tmp / "milvus" / "mirror.db"
    env = lv_environment(
        stack,
        registry,
        root,
        LV_DATABASE_URL=database_url,
        LV_BROKER_URL=broker_url,
        LV_MODEL="mir-a",
        LV_HOME=str(tmp / "home"),
        LV_MILVUS_URI=str(milvus_path),
        LV_RUN_CHUNK_SIZE="8",
    )
    # This process is a user of the shared milvus-lite server too (the workers reuse it).
    with EmbeddedMilvus(milvus_path) as url, MilvusStore(url) as store:
        yield Mirror(env, engine, make_sessions(engine), root, tmp, store, milvus_path)
    engine.dispose()


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _mirrored(mirror: Mirror, model: str) -> Callable[[], bool]:
    def check() -> bool:
        shas = mirror.stored_shas(model)
        return bool(shas) and mirror.store.present(model, shas) == set(shas)

    return check


def _metric(port: int, name: str) -> float:
    return scrape(port)[(name, (("model", "mir-a"),))]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _assert_same_vectors(mirror: Mirror, model: str) -> int:
    shas = mirror.stored_shas(model)
    with mirror.sessions() as session:
        pgvector = stored_vectors(session, model, shas)
    milvus = mirror.store.vectors(model, shas)
    assert set(milvus) == set(pgvector) == set(shas)
    for sha in shas:
        assert np.abs(milvus[sha] - pgvector[sha]).max() <= 1e-5, sha
    return len(shas)


def test_a_jobs_embeddings_reach_milvus_with_pgvectors_vectors_and_the_alias_finds_them(
    mirror: Mirror,
) -> None:
    events = mirror.events("job", 12)
    # A near-duplicate of job-3: the same drawing, resized by a pixel and re-encoded.
    twin = mirror.root / "twin.jpg"
    images.save(images.product_image(COLOURS[3], SHAPES[0], (64 + 21 + 1, 64 + 3)), twin)
    events.append({"listing_id": "twin", "title": "gold circle", "image_url": twin.as_uri()})
    with mirror.worker(), mirror.producer() as producer:
        report = producer.enqueue(events)
        counts = producer.wait(report.job_ids, timeout=120)
        _wait_for(_mirrored(mirror, "mir-a"), "the job's embeddings in Milvus")
        _wait_for(lambda: mirror.store.alias_target() is not None, "the alias")
    assert counts["succeeded"] == len(events), counts
    assert _assert_same_vectors(mirror, "mir-a") == len(events)
    assert mirror.store.dimension("mir-a") == 32
    assert mirror.store.count("mir-a") == len(events)
    assert mirror.store.alias_target() == collection_name("mir-a")

    with mirror.sessions() as session:
        (query,) = listing_vectors(session, "job-3", "mir-a")
        through_alias = nearest_listings(session, mirror.store, query, 3, leave_out="job-3")
        in_pgvector = pgvector_nearest(session, "job-3", "mir-a", 32, 3)
    assert through_alias[0].listing_id == in_pgvector[0].listing_id == "twin"
    assert through_alias[0].distance == pytest.approx(in_pgvector[0].distance, abs=1e-4)
    assert len(through_alias) == 3


def test_sending_the_same_jobs_again_does_not_duplicate_rows(mirror: Mirror) -> None:
    events = mirror.events("again", 6)
    with mirror.worker(), mirror.producer() as producer:
        first = producer.enqueue(events)
        producer.wait(first.job_ids, timeout=120)
        send_analysis(producer.celery, first.job_ids, "mir-a")  # the same messages again
        second = producer.enqueue(events)  # and the same listings as new jobs
        counts = producer.wait(second.job_ids, timeout=120)
        _wait_for(_mirrored(mirror, "mir-a"), "the embeddings in Milvus")
    assert counts["succeeded"] == len(events)
    rewrite = mirror.mirror_command("mirror", "--model", "mir-a", "--all")  # every row again
    assert rewrite.returncode == 0, rewrite.stderr
    stored = len(mirror.stored_shas("mir-a"))
    assert f"mir-a: {stored} embedding(s) in pgvector" in rewrite.stdout
    assert mirror.store.count("mir-a") == stored
    _assert_same_vectors(mirror, "mir-a")


def test_a_stopped_milvus_fails_no_job_and_the_worker_catches_up_when_it_is_back(
    mirror: Mirror,
) -> None:
    """A Milvus server that is down: jobs succeed, failures are counted, the embeddings wait
    in the worker and are written when the server answers again."""
    port, metrics_port = free_port(), free_port()
    server_dir = mirror.tmp / "server-data"
    events = mirror.events("away", 8)
    env = {"LV_MILVUS_URI": f"http://127.0.0.1:{port}", "LV_METRICS_PORT": str(metrics_port)}
    with mirror.worker(**env) as worker, mirror.producer() as producer:
        report = producer.enqueue(events)
        counts = producer.wait(report.job_ids, timeout=120)
        assert counts["succeeded"] == len(events), counts
        _wait_for(lambda: _metric(metrics_port, "lv_mirror_backlog") == len(events), "backlog")
        assert _metric(metrics_port, "lv_mirror_failures_total") >= 1
        assert "Milvus mirror behind (jobs are not affected)" in worker.log()
        server = subprocess.Popen(
            [sys.executable, "-m", "listing_vision.embedded_milvus", str(server_dir), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(lambda: _answers(port), "the Milvus server to start")
            with MilvusStore(f"http://127.0.0.1:{port}", timeout=30) as store:
                shas = mirror.stored_shas("mir-a")

                def caught_up() -> bool:
                    return store.has_collection("mir-a") and len(
                        store.present("mir-a", shas)
                    ) == len(events)

                _wait_for(caught_up, "the worker to write its backlog", timeout=180)
            assert _metric(metrics_port, "lv_mirror_written_total") == len(events)
            assert _metric(metrics_port, "lv_mirror_backlog") == 0
        finally:
            server.terminate()
            server.wait(30)
    assert "Milvus mirror caught up" in worker.log()


def test_a_bad_milvus_path_fails_no_job_and_the_mirror_command_catches_up(
    mirror: Mirror,
) -> None:
    events = mirror.events("badpath", 5)
    bad = str(Path("/dev/null") / "no-such-dir" / "mirror.db")  # a file's child: cannot exist
    with mirror.worker(LV_MILVUS_URI=bad) as worker, mirror.producer() as producer:
        report = producer.enqueue(events)
        counts = producer.wait(report.job_ids, timeout=120)
        assert "Milvus mirror off in this process" in worker.log()
    assert counts["succeeded"] == len(events), counts
    new = [f"badpath-{i}" for i in range(len(events))]
    with mirror.sessions() as session:
        shas = list(
            session.scalars(
                text("SELECT sha256 FROM listing_images WHERE listing_id = ANY(:ids)"),
                {"ids": new},
            )
        )
    assert len(shas) == len(events)
    assert mirror.store.present("mir-a", shas) == set()
    stored = mirror.stored_shas("mir-a")
    missing = len(stored) - len(mirror.store.present("mir-a", stored))  # the earlier test's too

    behind = mirror.mirror_command("mirror", "--check")
    assert behind.returncode == 1 and f"{missing} behind" in behind.stdout, behind.stdout
    caught = mirror.mirror_command("mirror")
    assert caught.returncode == 0, caught.stderr
    assert f"{missing} written" in caught.stdout
    assert mirror.store.present("mir-a", shas) == set(shas)
    _assert_same_vectors(mirror, "mir-a")
    again = mirror.mirror_command("mirror", "--model", "mir-a")  # idempotent: nothing to do
    assert again.returncode == 0 and " 0 written" in again.stdout, again.stdout
    check = mirror.mirror_command("mirror", "--check")
    assert check.returncode == 0 and "up to date" in check.stdout, check.stdout


def test_reindex_points_the_alias_at_the_new_models_collection_and_rollback_back(
    mirror: Mirror,
) -> None:
    assert mirror.store.alias_target() == collection_name("mir-a")
    with mirror.workers("mir-a", "mir-b"), mirror.producer() as producer:
        run_id = RunProducer(producer).start_reindex("mir-b")
        _wait_for(
            lambda: (
                mirror.scalar("SELECT status FROM runs WHERE run_id = :r", r=run_id)
                not in ("pending", "running")
            ),
            "the reindex run",
        )
        assert mirror.scalar("SELECT status FROM runs WHERE run_id = :r", r=run_id) == "succeeded"
        _wait_for(
            lambda: mirror.store.alias_target() == collection_name("mir-b"),
            "the alias to follow the switch",
        )
    assert mirror.scalar("SELECT model_id FROM active_model") == "mir-b"
    assert mirror.store.dimension("mir-b") == 48
    assert _assert_same_vectors(mirror, "mir-b") == mirror.store.count("mir-b") > 0
    with mirror.sessions() as session:
        (query,) = listing_vectors(session, "job-3", "mir-b")
        hits = nearest_listings(session, mirror.store, query, 1)  # through the alias: mir-b
    assert hits[0].listing_id == "job-3" and hits[0].distance == pytest.approx(0, abs=1e-5)

    rollback = mirror.mirror_command("reindex", "--rollback")
    assert rollback.returncode == 0, rollback.stderr
    assert "Milvus alias lv_active names mir-a's collection" in rollback.stdout
    assert mirror.store.alias_target(ACTIVE_ALIAS) == collection_name("mir-a")
    assert mirror.scalar("SELECT model_id FROM active_model") == "mir-a"


def test_beats_schedule_catches_up_what_the_mirror_lost(mirror: Mirror) -> None:
    shas = mirror.stored_shas("mir-a")[:4]
    mirror.store._client.delete(collection_name("mir-a"), ids=shas)  # lost, as by a crash
    assert mirror.store.present("mir-a", shas) == set()
    env = {**mirror.env, "LV_RESCORE_SCHEDULE": "every 2"}
    with open(mirror.tmp / "beat.log", "wb") as log:
        beat = subprocess.Popen(
            [sys.executable, "-m", "listing_vision", "beat"], env=env, stdout=log, stderr=log
        )
        try:
            _wait_for(
                lambda: mirror.store.present("mir-a", shas) == set(shas), "beat's catch-up", 120
            )
        finally:
            beat.terminate()
            beat.wait(30)
    _assert_same_vectors(mirror, "mir-a")


def test_the_backlog_is_bounded_and_a_closing_mirror_does_not_hang(mirror: Mirror) -> None:
    """Milvus away for long: what does not fit is dropped and counted (the catch-up's), the
    writers' calls return at once, and closing gives up after one attempt."""
    port = free_port()  # nobody listens
    registry = CollectorRegistry()
    writer = MirrorWriter(
        mirror.sessions,
        lambda: MilvusStore(f"http://127.0.0.1:{port}", timeout=2),
        "mir-a",
        registry=registry,
        max_backlog=3,
    )
    outcome = ListingOutcome(
        "x",
        "mir-a",
        ResultRecord("ok"),
        None,
        new_embeddings={f"{i:064x}": [0.0] * 32 for i in range(5)},
    )
    started = time.monotonic()
    writer.written([outcome])
    writer.written([outcome])  # the same embeddings again: nothing new waits
    queued = time.monotonic() - started
    _wait_for(lambda: writer.stats.failures >= 1, "a failed attempt")
    started = time.monotonic()
    writer.close()
    closing = time.monotonic() - started
    assert queued < 1.0 and closing < 10.0
    assert (writer.stats.backlog, writer.stats.dropped, writer.stats.written) == (3, 4, 0)
    assert registry.get_sample_value("lv_mirror_dropped_total", {"model": "mir-a"}) == 4
    assert registry.get_sample_value("lv_mirror_backlog", {"model": "mir-a"}) == 3
