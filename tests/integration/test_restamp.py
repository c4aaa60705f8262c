"""db.restamp: after a switch, the new active model's rows get new change_seq values in batches,
each once, resumable, never holding result writers for longer than a batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from contract.broker import WATCH_RUNS_TASK, make_celery
from contract.registry import ModelSpec
from contract.settings import load_settings
from db import migrate, registered_models
from db.engine import make_sessions
from db.restamp import mark_for_restamp, pending_restamp, restamp_batch, restamp_pending
from listing_vision.beat import make_beat_app
from listing_vision.health import check_health
from tests.integration.conftest import OwnServers, Stack, own_servers


@pytest.fixture(scope="module")
def own(stack: Stack) -> Iterator[OwnServers]:
    """A database of its own: these tests switch the active model."""
    own = own_servers(stack, "lv_restamp", broker_db=13)
    yield own
    own.engine.dispose()


@pytest.fixture(scope="module")
def engine(own: OwnServers) -> Engine:
    return own.engine


def _results(sessions: sessionmaker[Session], model_id: str, rows: int) -> None:
    """`model_id` registered, with an ok result for each of `rows` listings of its own."""
    with sessions.begin() as session:
        registered_models.ensure_model(session, ModelSpec(model_id, "open_clip", "x", 0.5))
        for table, values in (
            ("listings (listing_id, title, image_urls)", "'t', '[]'::jsonb"),
            ("results (listing_id, model_id, status)", f"'{model_id}', 'ok'"),
        ):
            session.execute(
                text(
                    f"INSERT INTO {table} SELECT :m || '-' || i, {values} "
                    "FROM generate_series(1, :n) i ON CONFLICT DO NOTHING"
                ),
                {"m": model_id, "n": rows},
            )


def _switch(sessions: sessionmaker[Session], model_id: str) -> int:
    """Switch to `model_id` as a reindex does; the last change_seq before the switch."""
    with sessions.begin() as session:
        registered_models.switch_active_model(session, model_id)
        mark_for_restamp(session)
        return int(session.scalar(text("SELECT max(change_seq) FROM results")) or 0)


def _seqs(sessions: sessionmaker[Session], model_id: str) -> list[int]:
    with sessions() as session:
        found = session.scalars(
            text("SELECT change_seq FROM results WHERE model_id = :m ORDER BY change_seq"),
            {"m": model_id},
        )
        return [int(seq) for seq in found]


def _sequence_value(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(text("SELECT last_value FROM listing_results_change_seq")))


def test_every_row_gets_one_new_value_in_batches_each_under_the_statement_limit(
    engine: Engine,
) -> None:
    """30,000 rows restamped in one statement take about 0.6 s here: past a 300 ms statement
    limit. In batches of 1,500 each statement stays well under it, and each row is stamped
    exactly once (the sequence moves by the row count)."""
    sessions = make_sessions(engine)
    _results(sessions, "rs-batches", 30_000)
    _results(sessions, "rs-other", 500)  # another model's rows in the same range: left alone
    other_before = _seqs(sessions, "rs-other")
    through = _switch(sessions, "rs-batches")
    before = _sequence_value(sessions)
    total, batches = 0, 0
    while True:
        with sessions.begin() as session:
            session.execute(text("SET LOCAL statement_timeout = '300ms'"))
            done = restamp_batch(session, rows=1_500)
        assert done is not None
        if done == 0:
            break
        total, batches = total + done, batches + 1
    assert (total, batches) == (30_000, 20)
    assert _sequence_value(sessions) - before == 30_000
    assert min(_seqs(sessions, "rs-batches")) > through
    assert _seqs(sessions, "rs-other") == other_before
    with sessions() as session:
        assert pending_restamp(session) is None


def test_a_restamp_cut_short_goes_on_from_its_last_batch(engine: Engine) -> None:
    sessions = make_sessions(engine)
    _results(sessions, "rs-resume", 1_000)
    through = _switch(sessions, "rs-resume")
    with sessions.begin() as session:
        assert restamp_batch(session, rows=400) == 400
    with sessions() as session:
        pending = pending_restamp(session)
    assert pending is not None and pending.model_id == "rs-resume"
    assert pending.through == through and 0 < pending.after < through
    before = _sequence_value(sessions)
    assert restamp_pending(engine, rows=250) == 600  # the rest, and no row twice
    assert _sequence_value(sessions) - before == 600
    assert min(_seqs(sessions, "rs-resume")) > through
    assert restamp_pending(engine) == 0


def test_a_row_written_after_the_switch_keeps_its_new_value(engine: Engine) -> None:
    sessions = make_sessions(engine)
    _results(sessions, "rs-live", 300)
    _switch(sessions, "rs-live")
    with sessions.begin() as session:  # a live write of one listing, before the restamp
        session.execute(text("UPDATE results SET status = 'failed' WHERE listing_id = 'rs-live-7'"))
        live = session.scalar(text("SELECT change_seq FROM results WHERE listing_id = 'rs-live-7'"))
    assert restamp_pending(engine, rows=100) == 299
    with sessions() as session:
        kept = session.scalar(text("SELECT change_seq FROM results WHERE listing_id = 'rs-live-7'"))
    assert kept == live


def test_a_new_switch_replaces_a_restamp_still_pending(engine: Engine) -> None:
    sessions = make_sessions(engine)
    _results(sessions, "rs-first", 200)
    _results(sessions, "rs-second", 200)
    _switch(sessions, "rs-first")
    through = _switch(sessions, "rs-second")  # before any batch of the first
    assert restamp_pending(engine) == 200
    assert min(_seqs(sessions, "rs-second")) > through


def test_a_result_writer_gets_through_between_batches(engine: Engine) -> None:
    """A writer of another model's result during the restamp commits while the restamp is still
    going (in one transaction, it waited for the whole of it)."""
    sessions = make_sessions(engine)
    _results(sessions, "rs-wait", 12_000)  # 120 batches
    _results(sessions, "rs-writer", 1)
    through = _switch(sessions, "rs-wait")
    restamp = threading.Thread(target=restamp_pending, args=(engine, 100))
    restamp.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the first batch is in
            with sessions() as session:
                pending = pending_restamp(session)
            assert pending is not None and time.monotonic() < deadline
            if pending.after > 0:
                break
            time.sleep(0.005)
        with sessions.begin() as session:
            session.execute(
                text("UPDATE results SET status = 'ok' WHERE listing_id = 'rs-writer-1'")
            )
        with sessions() as session:
            waiting = session.scalar(
                text(
                    "SELECT count(*) FROM results WHERE model_id = 'rs-wait' AND change_seq <= :t"
                ),
                {"t": through},
            )
        assert waiting > 0  # the writer is in, and the restamp still has rows to do
    finally:
        restamp.join(60)
    with sessions() as session:
        assert pending_restamp(session) is None


def test_beats_watch_finishes_a_restamp_its_process_left(
    own: OwnServers, engine: Engine, tmp_path: Path
) -> None:
    """The process that switched died after the switch's commit: within a minute beat's watch
    restamps the rest."""
    sessions = make_sessions(engine)
    _results(sessions, "rs-orphan", 700)
    through = _switch(sessions, "rs-orphan")
    settings = load_settings(home=str(tmp_path)).with_servers(own.database_url, own.broker_url)
    watch = make_beat_app(settings).tasks[WATCH_RUNS_TASK]
    assert watch() == {"produced": [], "completed": [], "restamped": 700}
    assert min(_seqs(sessions, "rs-orphan")) > through
    assert watch()["restamped"] == 0


def test_health_names_a_restamp_left_pending_too_long(
    own: OwnServers, engine: Engine, tmp_path: Path
) -> None:
    sessions = make_sessions(engine)
    _results(sessions, "rs-health", 10)
    _switch(sessions, "rs-health")
    settings = load_settings(home=str(tmp_path)).with_servers(own.database_url, own.broker_url)
    app = make_celery(settings)
    fresh = check_health(settings, app, timedelta(hours=1))
    assert fresh.checks["restamp"] == "pending (rs-health)"
    assert not [problem for problem in fresh.problems if problem.startswith("restamp")]
    late = check_health(settings, app, timedelta(0))
    assert [
        problem for problem in late.problems if problem.startswith("restamp: rows of rs-health")
    ]
    restamp_pending(engine)
    assert check_health(settings, app, timedelta(0)).checks["restamp"] == "none"


def test_a_downgrade_finishes_a_pending_restamp_first(engine: Engine) -> None:
    """The code before migration 0007 knows nothing of a pending restamp (last in this module:
    it migrates the database down and back up)."""
    sessions = make_sessions(engine)
    _results(sessions, "rs-down", 50)
    through = _switch(sessions, "rs-down")
    with sessions.begin() as session:
        assert restamp_batch(session, rows=20) == 20
    with engine.begin() as connection:
        config = migrate._config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0006")
    try:
        assert min(_seqs(sessions, "rs-down")) > through
    finally:
        migrate.upgrade(engine)
