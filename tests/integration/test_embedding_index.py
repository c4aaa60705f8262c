"""A model's HNSW index: set aside while a reindex backfills it, built in one concurrent pass
before the run switches models, and rebuilt when an interrupted build left it invalid."""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from contract.broker import WATCH_RUNS_TASK
from contract.registry import ModelSpec
from contract.settings import load_settings
from db import registered_models, runs
from db.embedding_index import (
    BUILD_LOCK,
    build_index,
    build_progress,
    holds_rows_sql,
    index_name,
    index_state,
    set_aside_empty_index,
)
from db.embeddings import insert_embeddings
from db.engine import make_sessions
from db.images import insert_image_facts
from db.locks import try_session_lock
from db.records import ImageFacts, ListingImageRecord
from db.run_completion import complete_run
from db.runs import NewRun
from db.schema import Run
from listing_vision.beat import make_beat_app
from listing_vision.runs_command import RunProgress, print_runs
from producer.enqueue import Producer
from producer.runs import RunProducer
from tests.integration.conftest import OwnServers, Stack, own_servers
from worker.runtime import build_index_if_due, start_index_build

DIM = 8


@pytest.fixture(scope="module")
def own(stack: Stack) -> Iterator[OwnServers]:
    """A database of its own: completing a reindex here switches the active model."""
    own = own_servers(stack, "lv_index", broker_db=12)
    yield own
    own.engine.dispose()


@pytest.fixture(scope="module")
def engine(own: OwnServers) -> Engine:
    return own.engine


def _model(sessions: sessionmaker[Session], model_id: str, rows: int) -> None:
    """Register `model_id` (as a worker that loaded it would) with `rows` embeddings."""
    rng = np.random.default_rng(len(model_id))
    shas = [f"{model_id}-{i}" for i in range(rows)]
    with sessions.begin() as session:
        registered_models.ensure_model(session, ModelSpec(model_id, "open_clip", "x", 0.5))
        registered_models.record_loaded(session, model_id, embed_dim=DIM, scoring="cosine")
        insert_image_facts(
            session,
            [
                ListingImageRecord(0, "file:///x.jpg", ImageFacts(s, 8, 8, "JPEG", 1, 1.0, 0.5))
                for s in shas
            ],
        )
        vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
        insert_embeddings(session, model_id, dict(zip(shas, vectors, strict=True)))


def _done_reindex(sessions: sessionmaker[Session], model_id: str, rows: int) -> uuid.UUID:
    """A reindex run to `model_id` whose backfill (`rows` embeddings) is done, not completed."""
    _model(sessions, model_id, rows)
    with sessions.begin() as session:
        run_id = runs.create_run(session, NewRun("reindex", model_id))
        session.execute(
            text("UPDATE runs SET status = 'running', produced_at = now() WHERE run_id = :r"),
            {"r": run_id},
        )
    return run_id


def _state(engine: Engine, model_id: str) -> str:
    with make_sessions(engine)() as session:
        return index_state(session, model_id)


def test_a_build_replaces_an_invalid_index_and_a_second_builder_steps_aside(
    engine: Engine,
) -> None:
    sessions = make_sessions(engine)
    _model(sessions, "ix-build", 300)
    assert _state(engine, "ix-build") == "missing"
    with engine.connect() as holder:  # another process building it now
        assert try_session_lock(holder, index_name("ix-build"))
        assert build_index(engine, "ix-build", DIM) is False
        assert _state(engine, "ix-build") == "missing"
        holder.invalidate()  # closed, not pooled: its session lock goes with it
    assert build_index(engine, "ix-build", DIM) is True
    assert _state(engine, "ix-build") == "valid"

    with sessions.begin() as session:  # what a build interrupted halfway leaves behind
        session.execute(
            text("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(:n)"),
            {"n": index_name("ix-build")},
        )
    assert _state(engine, "ix-build") == "invalid"
    assert build_index(engine, "ix-build", DIM) is True
    assert _state(engine, "ix-build") == "valid"
    with sessions() as session:
        definition = session.scalar(
            text("SELECT pg_get_indexdef(to_regclass(:n))"), {"n": index_name("ix-build")}
        )
    assert "hnsw" in definition and f"vector({DIM})" in definition, definition


def test_only_an_empty_index_is_set_aside(engine: Engine) -> None:
    sessions = make_sessions(engine)
    _model(sessions, "ix-empty", 0)
    _model(sessions, "ix-full", 20)
    for model_id in ("ix-empty", "ix-full"):
        assert build_index(engine, model_id, DIM)
    assert set_aside_empty_index(engine, "ix-empty", DIM) is True
    assert set_aside_empty_index(engine, "ix-full", DIM) is False  # rebuilding would cost more
    assert set_aside_empty_index(engine, "ix-none", DIM) is False
    assert _state(engine, "ix-empty") == "missing"
    assert _state(engine, "ix-full") == "valid"


def test_a_worker_builds_its_index_at_start_unless_a_reindex_to_its_model_is_under_way(
    engine: Engine,
) -> None:
    sessions = make_sessions(engine)
    _model(sessions, "ix-start", 50)
    _model(sessions, "ix-target", 50)  # rows of a cancelled reindex, say
    with sessions.begin() as session:
        runs.create_run(session, NewRun("reindex", "ix-target"))
    try:
        assert build_index_if_due(engine, "ix-target", DIM, None) == "deferred"
        assert _state(engine, "ix-target") == "missing"
        assert build_index_if_due(engine, "ix-start", DIM, None) == "built"
        assert _state(engine, "ix-start") == "valid"
        assert build_index_if_due(engine, "ix-start", DIM, None) == "present"
    finally:
        with sessions.begin() as session:
            session.execute(
                text("UPDATE runs SET status = 'cancelled' WHERE model_id = 'ix-target'")
            )
    assert build_index_if_due(engine, "ix-target", DIM, None) == "built"


def test_a_build_past_its_memory_says_so_in_the_log(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _model(make_sessions(engine), "ix-memory", 3000)
    with caplog.at_level(logging.WARNING, logger="db.embedding_index"):
        assert build_index(engine, "ix-memory", DIM, memory="1MB")
    assert any("maintenance_work_mem" in r.getMessage() for r in caplog.records), caplog.text


def test_beat_completes_a_done_reindex_left_open_after_building_its_index(
    own: OwnServers, tmp_path: Path
) -> None:
    engine = own.engine
    sessions = make_sessions(engine)
    _model(sessions, "ix-old", 5)
    _model(sessions, "ix-new", 200)  # the backfill's rows, written with no index
    with sessions.begin() as session:
        registered_models.switch_active_model(session, "ix-old")
        run_id = runs.create_run(session, NewRun("reindex", "ix-new", previous_model_id="ix-old"))
    assert complete_run(engine, run_id) is None  # not produced yet: nothing to complete
    assert _state(engine, "ix-new") == "missing"

    with sessions.begin() as session:  # every chunk done, the completing worker gone
        session.execute(
            text(
                "UPDATE runs SET status = 'running', produced_at = now(), "
                "updated_at = now() - interval '1 hour' WHERE run_id = :r"
            ),
            {"r": run_id},
        )
    with sessions() as session:
        left_open = runs.done_runs_left_open(session, timedelta(minutes=2))
    assert [run.run_id for run in left_open] == [run_id]

    settings = load_settings(home=str(tmp_path)).with_servers(own.database_url, own.broker_url)
    watch = make_beat_app(settings).tasks[WATCH_RUNS_TASK]
    assert watch() == {"produced": [], "completed": [str(run_id)], "restamped": 0}
    assert _state(engine, "ix-new") == "valid"
    with sessions() as session:
        assert registered_models.active_model_row(session).model_id == "ix-new"  # type: ignore[union-attr]
        assert runs.done_runs_left_open(session, timedelta(minutes=2)) == []
    assert complete_run(engine, run_id) is None  # completed once
    assert complete_run(engine, uuid.uuid4()) is None


def test_a_failing_build_fails_the_run_with_why_and_resume_builds_again(
    own: OwnServers, tmp_path: Path
) -> None:
    engine = own.engine
    sessions = make_sessions(engine)
    _model(sessions, "ix-bad", 30)
    with sessions.begin() as session:
        insert_image_facts(
            session,
            [ListingImageRecord(0, "file:///x.jpg", ImageFacts("odd", 8, 8, "JPEG", 1, 1.0, 0.5))],
        )
        insert_embeddings(session, "ix-bad", {"odd": [1.0] * (DIM - 1)})  # a row no index takes
        active = registered_models.active_model_row(session)
        active_id = None if active is None else active.model_id
        run_id = runs.create_run(session, NewRun("reindex", "ix-bad"))
        session.execute(
            text("UPDATE runs SET status = 'running', produced_at = now() WHERE run_id = :r"),
            {"r": run_id},
        )
    assert complete_run(engine, run_id) is None
    with sessions() as session:
        run = runs.get_run(session, run_id)
        assert run is not None and run.status == "failed", run
        assert run.error == (
            "the HNSW index of ix-bad could not be built: expected 8 dimensions, not 7"
        ), run.error
        now = registered_models.active_model_row(session)
        assert (None if now is None else now.model_id) == active_id  # no switch
    assert _state(engine, "ix-bad") != "valid"

    with sessions.begin() as session:
        session.execute(text("DELETE FROM embeddings WHERE sha256 = 'odd'"))
    settings = load_settings(home=str(tmp_path)).with_servers(own.database_url, own.broker_url)
    with Producer(settings) as producer:
        RunProducer(producer).resume(run_id)
    with sessions() as session:
        run = runs.get_run(session, run_id)
        assert run is not None and run.status == "succeeded", run
    assert _state(engine, "ix-bad") == "valid"


def test_the_set_aside_drops_an_invalid_index_even_with_rows(engine: Engine) -> None:
    sessions = make_sessions(engine)
    _model(sessions, "ix-invalid", 20)
    assert build_index(engine, "ix-invalid", DIM)
    with sessions.begin() as session:  # an interrupted build's: still maintained on inserts
        session.execute(
            text("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(:n)"),
            {"n": index_name("ix-invalid")},
        )
    assert set_aside_empty_index(engine, "ix-invalid", DIM) is True
    assert _state(engine, "ix-invalid") == "missing"


def test_the_set_aside_probe_asks_the_index_not_the_table(engine: Engine) -> None:
    _model(make_sessions(engine), "ix-probe", 50)
    assert build_index(engine, "ix-probe", DIM)
    with engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        plan = connection.execute(
            text("EXPLAIN " + holds_rows_sql("ix-probe", DIM)), {"probe": "[" + "1," * 7 + "1]"}
        ).scalars()
        plan_text = "\n".join(plan)
        connection.rollback()
    assert f"Index Scan using {index_name('ix-probe')}" in plan_text, plan_text


def _cut_short(
    engine: Engine,
    run_id: uuid.UUID,
    model_id: str,
    while_waiting: Callable[[str, RunProgress, Run], None] = lambda *_: None,
    *,
    last_try: bool = False,
) -> list[object]:
    """Complete the run in a thread whose build waits for a writer's open transaction (as
    CREATE INDEX CONCURRENTLY does), call `while_waiting` with its progress, then end the
    build's connection as a server restart would; what `complete_run` returned."""
    sessions = make_sessions(engine)
    writer = sessions()
    writer.execute(
        text("UPDATE embeddings SET embedding = embedding WHERE sha256 = :s"),
        {"s": f"{model_id}-0"},
    )
    outcome: list[object] = []
    build = threading.Thread(
        target=lambda: outcome.append(complete_run(engine, run_id, last_try=last_try))
    )
    build.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            with sessions() as session:
                phase = build_progress(session, model_id)
                run = runs.get_run(session, run_id)
                assert run is not None
                progress = RunProgress.read(session, run)
            if (phase or "").startswith("waiting for writers") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert phase is not None and phase.startswith("waiting for writers"), phase
        while_waiting(phase, progress, run)
        with sessions.begin() as session:
            ended = session.scalar(
                text(
                    "SELECT pg_terminate_backend(p.pid) FROM pg_stat_progress_create_index p "
                    "JOIN pg_class c ON c.oid = p.index_relid WHERE c.relname = :n"
                ),
                {"n": index_name(model_id)},
            )
        assert ended is True
        build.join(30)
        assert not build.is_alive()
    finally:
        writer.rollback()
        writer.close()
        build.join(30)
    return outcome


def test_a_build_cut_short_leaves_the_run_open_showing_its_build_and_the_next_one_completes(
    own: OwnServers,
) -> None:
    """Meanwhile the run shows its build; the server's ending the build's connection is
    passing trouble, so the run stays open and the next completion builds."""
    engine = own.engine
    sessions = make_sessions(engine)
    run_id = _done_reindex(sessions, "ix-cut", 40)

    def shows_its_build(phase: str, progress: RunProgress, run: Run) -> None:
        assert progress.index_build == phase and not progress.stalled
        assert f"building its HNSW index before the switch ({phase})" in progress.line()
        shown = io.StringIO()
        with sessions() as session:
            print_runs(Console(file=shown, width=200), session, [run])
        assert "running (building index)" in shown.getvalue(), shown.getvalue()

    assert _cut_short(engine, run_id, "ix-cut", shows_its_build) == [None]
    with sessions() as session:
        run = runs.get_run(session, run_id)
        assert run is not None and run.status == "running" and run.error is None, run
    assert _state(engine, "ix-cut") == "invalid"  # what the cut build left behind

    completed = complete_run(engine, run_id)
    assert completed is not None and completed.model_id == "ix-cut"
    assert _state(engine, "ix-cut") == "valid"


def test_passing_trouble_at_the_watchs_last_try_fails_the_run(own: OwnServers) -> None:
    engine = own.engine
    sessions = make_sessions(engine)
    run_id = _done_reindex(sessions, "ix-giveup", 40)

    assert _cut_short(engine, run_id, "ix-giveup", last_try=True) == [None]

    with sessions() as session:
        run = runs.get_run(session, run_id)
        active = registered_models.active_model_row(session)
    assert run is not None and run.status == "failed", run
    assert run.error is not None and "could not be built: terminating connection" in run.error
    assert "gave up" in run.error
    assert active is None or active.model_id != "ix-giveup"


@contextmanager
def _holding_the_build_lock(engine: Engine, model_id: str) -> Iterator[None]:
    """Another process building `model_id`'s index: the build lock and the model's."""
    with engine.connect() as holder:
        assert try_session_lock(holder, BUILD_LOCK)
        assert try_session_lock(holder, index_name(model_id))
        try:
            yield
        finally:
            holder.invalidate()  # closed, not pooled: its session locks go with it


def test_one_build_at_a_time_on_the_table_and_a_run_waiting_for_it_says_so(
    own: OwnServers,
) -> None:
    """Two concurrent builds on one table deadlock (PostgreSQL ends one, often the one nearly
    done): a build of another model steps aside, and its done run waits, shown as waiting."""
    engine = own.engine
    sessions = make_sessions(engine)
    run_id = _done_reindex(sessions, "ix-queued", 30)
    with _holding_the_build_lock(engine, "ix-elsewhere"):
        assert build_index(engine, "ix-queued", DIM) is False
        assert set_aside_empty_index(engine, "ix-queued", DIM) is False
        assert complete_run(engine, run_id) is None
        with sessions() as session:
            run = runs.get_run(session, run_id)
            assert run is not None and run.status == "running" and run.error is None
            progress = RunProgress.read(session, run)
            assert build_progress(session, "ix-elsewhere") == "starting its build"
        assert progress.index_build == "waiting for another model's HNSW index build"
        assert not progress.stalled and "waiting for another model's" in progress.line()
        shown = io.StringIO()
        with sessions() as session:
            print_runs(Console(file=shown, width=200), session, [run])
        assert "running (index build waiting)" in shown.getvalue(), shown.getvalue()
        assert _state(engine, "ix-queued") == "missing"
    with sessions() as session:
        assert build_progress(session, "ix-queued") is None
    completed = complete_run(engine, run_id)
    assert completed is not None and _state(engine, "ix-queued") == "valid"


def test_a_worker_start_build_tries_again_while_another_build_runs(engine: Engine) -> None:
    _model(make_sessions(engine), "ix-patient", 20)
    with _holding_the_build_lock(engine, "ix-elsewhere"):
        thread = start_index_build(engine, "ix-patient", DIM, None, retry_every=0.1)
        time.sleep(0.5)
        assert thread.is_alive() and _state(engine, "ix-patient") == "missing"
    thread.join(30)
    assert not thread.is_alive()
    assert _state(engine, "ix-patient") == "valid"
