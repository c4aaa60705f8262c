"""Job bookkeeping against the real database: attempts, fencing, superseded listings, and the
reconciler that re-sends jobs whose broker message was lost."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import text

from contract.broker import make_celery, send_analysis
from db import jobs, listings, results
from db.engine import make_sessions
from db.jobs import ClaimedJob, NewJob, Unclaimable
from db.records import JobOutcome, ListingOutcome, ListingRecord, ResultRecord
from tests.integration.conftest import Stack, query, sessions_with_model
from worker.reconciler import Lateness, Reconciler

pytestmark = pytest.mark.slow
MODEL = "states-model"


@pytest.fixture
def sessions(stack: Stack):  # type: ignore[no-untyped-def]
    return sessions_with_model(stack, MODEL)


def new_job(sessions, title: str = "a title") -> tuple[uuid.UUID, str]:  # type: ignore[no-untyped-def]
    listing_id = f"st-{uuid.uuid4().hex[:10]}"
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        listings.upsert_listings(
            session, [ListingRecord(listing_id, title, None, None, ["http://x/a.jpg"])]
        )
        jobs.create_jobs(session, [NewJob(job_id, listing_id, MODEL)])
    return job_id, listing_id


def claim(sessions, job_id: uuid.UUID, max_attempts: int = 3) -> ClaimedJob | Unclaimable:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        return jobs.claim(session, job_id, worker="test", max_attempts=max_attempts)


def outcome(claimed: ClaimedJob, similarity: float) -> JobOutcome:
    listing = ListingOutcome(
        listing_id=claimed.listing.listing_id,
        model_id=MODEL,
        result=ResultRecord("ok", similarity=similarity, is_match=True),
        listing_updated_at=claimed.listing.updated_at,
        job_id=claimed.job_id,
    )
    return JobOutcome(claimed.job_id, claimed.attempt, "succeeded", listing)


def record(sessions, item: JobOutcome) -> bool:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        return results.record_outcomes(session, [item])[0]


def test_attempts_are_capped_and_an_exhausted_job_cannot_be_claimed(sessions) -> None:  # type: ignore[no-untyped-def]
    job_id, _ = new_job(sessions)
    attempts = [claim(sessions, job_id, max_attempts=2) for _ in range(3)]
    assert [getattr(a, "attempt", None) for a in attempts[:2]] == [1, 2]
    assert isinstance(attempts[2], Unclaimable) and attempts[2].reason == "exhausted"
    assert attempts[2].attempts == 2


def test_a_stale_attempt_writes_nothing_once_a_redelivery_holds_the_job(
    stack: Stack, sessions
) -> None:  # type: ignore[no-untyped-def]
    job_id, listing_id = new_job(sessions)
    first = claim(sessions, job_id)
    second = claim(sessions, job_id)  # redelivered while the first still runs
    assert isinstance(first, ClaimedJob) and isinstance(second, ClaimedJob)
    assert record(sessions, outcome(first, 0.1)) is False
    assert query(stack, "SELECT * FROM results WHERE listing_id = :l", l=listing_id) == []
    assert record(sessions, outcome(second, 0.2)) is True
    row = query(stack, "SELECT similarity FROM results WHERE listing_id = :l", l=listing_id)
    assert row == [{"similarity": 0.2}]
    assert record(sessions, outcome(second, 0.3)) is False  # finished: a duplicate changes nothing


def test_a_job_that_analysed_an_older_listing_version_does_not_overwrite_the_newer(
    stack: Stack, sessions
) -> None:  # type: ignore[no-untyped-def]
    old_job, listing_id = new_job(sessions, "old title")
    old = claim(sessions, old_job)
    new_job_id = uuid.uuid4()
    with sessions.begin() as session:  # the catalogue changes the listing meanwhile
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "new title", None, None, ["http://x/b.jpg"])]
        )
        jobs.create_jobs(session, [NewJob(new_job_id, listing_id, MODEL)])
    new = claim(sessions, new_job_id)
    assert isinstance(old, ClaimedJob) and isinstance(new, ClaimedJob)
    assert record(sessions, outcome(new, 0.9)) is True
    assert record(sessions, outcome(old, 0.1)) is True  # the old job finishes...
    rows = query(stack, "SELECT similarity FROM results WHERE listing_id = :l", l=listing_id)
    assert rows == [{"similarity": 0.9}]  # ...but the newer version's result stands
    states = query(stack, "SELECT status FROM jobs WHERE listing_id = :l", l=listing_id)
    assert {s["status"] for s in states} == {"succeeded"}


def _queued_messages(stack: Stack, queue: str) -> int:
    return int(redis.Redis.from_url(stack.broker_url).llen(queue))


def test_reconciler_resends_jobs_whose_message_was_never_sent_and_only_once(
    stack: Stack, sessions, worker_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.conftest import settings_from

    app = make_celery(settings_from(worker_env))
    queue = f"lv.{MODEL}"
    redis.Redis.from_url(stack.broker_url).delete(queue)
    lost, _ = new_job(sessions)  # committed, but the producer died before sending
    stuck, _ = new_job(sessions)
    claim(sessions, stuck)  # claimed by a worker that then vanished with its message
    fresh, _ = new_job(sessions)  # just created: its producer is still sending it
    with sessions.begin() as session:
        session.execute(
            text(
                "UPDATE jobs SET updated_at = now() - interval '2 hours' WHERE job_id IN (:a, :b)"
            ),
            {"a": lost, "b": stuck},
        )

    def send(batch):  # type: ignore[no-untyped-def]
        send_analysis(app, batch, MODEL)

    late = Lateness(timedelta(seconds=60), timedelta(hours=1), timedelta(hours=1))
    reconciler = Reconciler(sessions, send, lambda chunks, countdown: None, MODEL, late)
    assert reconciler.run_once() == 2
    assert _queued_messages(stack, queue) == 2
    assert reconciler.run_once() == 0  # marked sent: not again
    sent = query(
        stack,
        "SELECT job_id FROM jobs WHERE job_id IN (:a, :b, :c) AND sent_at IS NOT NULL",
        a=lost,
        b=stuck,
        c=fresh,
    )
    assert {r["job_id"] for r in sent} == {lost, stuck}


def test_a_duplicate_delivery_during_the_last_attempt_leaves_the_live_attempt_alone(
    stack: Stack, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 #3: a second delivery while the last attempt still runs must not end the job
    `dead` and fence out the live attempt's good result."""
    job_id, _ = new_job(sessions)
    live = claim(sessions, job_id, max_attempts=1)
    assert isinstance(live, ClaimedJob)

    with sessions.begin() as session:
        duplicate = jobs.claim(
            session, job_id, worker="test", max_attempts=1, live_for=timedelta(minutes=5)
        )

    assert isinstance(duplicate, Unclaimable) and duplicate.reason == "running"
    assert 200 < duplicate.live_for_more <= 300  # kept until the live attempt must have ended
    assert record(sessions, outcome(live, 0.7))  # the live attempt still holds the job
    row = query(stack, "SELECT status FROM jobs WHERE job_id = :j", j=job_id)[0]
    assert row["status"] == "succeeded"


def test_a_last_attempt_running_past_the_time_limit_is_exhausted(sessions) -> None:  # type: ignore[no-untyped-def]
    job_id, _ = new_job(sessions)
    assert isinstance(claim(sessions, job_id, max_attempts=1), ClaimedJob)
    with sessions.begin() as session:
        session.execute(
            # Its worker died long ago; a re-send just now refreshed updated_at and sent_at,
            # which must not make the dead attempt look alive.
            text(
                "UPDATE jobs SET started_at = now() - interval '10 minutes', "
                "updated_at = now(), sent_at = now() WHERE job_id = :j"
            ),
            {"j": job_id},
        )
        redelivered = jobs.claim(
            session, job_id, worker="test", max_attempts=1, live_for=timedelta(minutes=5)
        )
    assert isinstance(redelivered, Unclaimable) and redelivered.reason == "exhausted"


def test_reconciler_resends_a_sent_job_whose_message_the_broker_lost(
    stack: Stack, sessions, worker_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 #4: sent, then lost (Valkey restarted empty): without a re-send it would stay
    `queued` forever."""
    from tests.integration.conftest import settings_from

    app = make_celery(settings_from(worker_env))
    queue = f"lv.{MODEL}"
    redis.Redis.from_url(stack.broker_url).delete(queue)
    lost, _ = new_job(sessions)
    waiting, _ = new_job(sessions)  # sent recently: still waiting its turn in the queue
    with sessions.begin() as session:
        jobs.mark_sent(session, [lost, waiting])
        session.execute(
            text("UPDATE jobs SET sent_at = now() - interval '2 hours' WHERE job_id = :a"),
            {"a": lost},
        )

    late = Lateness(timedelta(seconds=60), timedelta(hours=1), timedelta(hours=1))
    reconciler = Reconciler(
        sessions, lambda batch: send_analysis(app, batch, MODEL), lambda c, d: None, MODEL, late
    )
    assert reconciler.run_once() == 1
    assert _queued_messages(stack, queue) == 1
    assert reconciler.run_once() == 0  # sent again just now: not again
    redis.Redis.from_url(stack.broker_url).delete(queue)


def test_a_delivery_of_a_job_whose_last_attempt_looks_alive_is_kept_not_dropped(
    stack: Stack, sessions, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The review's H2: a last attempt whose write met a database outage retries itself; its
    retry finds the job `running` (its own stranded attempt). Acknowledged and dropped, the
    job would stay `running` forever; it must come back once that attempt has to be over."""
    from contract.registry import get_spec, load_registry
    from db.engine import make_engine
    from tests.unit.test_analysis import analyzer as listing_analyzer
    from worker.job_runner import JobRunner
    from worker.outcomes import OutcomeWriter
    from worker.shared_queries import SharedQueries

    job_id, _ = new_job(sessions)
    for _ in range(3):  # three claims: the last attempt is the one stranded
        claim(sessions, job_id, max_attempts=3)
    single = make_sessions(make_engine(stack.database_url, single_statements=True))
    queries = SharedQueries(
        single, model_id=MODEL, worker="w", max_attempts=3, attempt_limit=timedelta(minutes=5)
    )
    analyzer = listing_analyzer(get_spec(load_registry(), "lv-toy"), tmp_path, False)
    runner = JobRunner(sessions, queries, analyzer, OutcomeWriter(sessions), MODEL, "w", 3, 1.0)
    try:
        report = runner.run(job_id, redeliveries=1)
    finally:
        queries.close()
        runner.writer.close()
        analyzer.service.close()

    assert report.retry_in is not None and 250 < report.retry_in <= 301  # kept, comes back
    assert query(stack, "SELECT status FROM jobs WHERE job_id = :j", j=job_id)[0] == {
        "status": "running"
    }


def test_a_job_whose_last_attempt_never_finished_is_not_claimed_with_the_others(
    stack: Stack, sessions
) -> None:  # type: ignore[no-untyped-def]
    """Fault 6: its worker may have died of it; claimed with fresh jobs it would take an
    attempt of each of them with it every time. It is claimed on its own, later."""
    fresh, _ = new_job(sessions)
    interrupted, _ = new_job(sessions)
    assert isinstance(claim(sessions, interrupted), ClaimedJob)  # ... and its worker died

    with sessions.begin() as session:
        answers = jobs.claim_many(session, [fresh, interrupted], worker="w", max_attempts=3)
    assert isinstance(answers[fresh], ClaimedJob) and answers[fresh].attempt == 1
    held = answers[interrupted]
    assert isinstance(held, Unclaimable) and held.reason == "interrupted"
    assert query(stack, "SELECT attempts FROM jobs WHERE job_id = :j", j=interrupted) == [
        {"attempts": 1}
    ]  # no attempt counted for it

    with sessions.begin() as session:
        alone = jobs.claim_many(
            session, [interrupted], worker="w", max_attempts=3, interrupted=True
        )[interrupted]
    assert isinstance(alone, ClaimedJob) and alone.attempt == 2


def test_the_reconciler_publishes_in_bounded_batches_holding_no_row_lock(stack: Stack) -> None:
    """The review's M3: with a huge backlog, the reconciler locked up to 1,000 jobs and kept
    them locked while it published, so claims and group commits queued behind the broker."""
    model = "reconcile-batches"
    sessions = sessions_with_model(stack, model)
    ids = []
    for _ in range(5):
        listing_id = f"rb-{uuid.uuid4().hex[:10]}"
        job_id = uuid.uuid4()
        with sessions.begin() as session:
            listings.upsert_listings(
                session, [ListingRecord(listing_id, "t", None, None, ["http://x/a.jpg"])]
            )
            jobs.create_jobs(session, [NewJob(job_id, listing_id, model)])
        ids.append(job_id)
    with sessions.begin() as session:
        session.execute(
            text("UPDATE jobs SET updated_at = now() - interval '2 hours' WHERE job_id = ANY(:i)"),
            {"i": ids},
        )
    batches: list[list[uuid.UUID]] = []
    lockable: list[bool] = []

    def send(batch):  # type: ignore[no-untyped-def]
        batches.append(list(batch))
        # While the batch is being published, a worker can lock its rows (to claim them).
        with sessions.begin() as other:
            locked = other.execute(
                text(
                    "SELECT job_id FROM jobs WHERE job_id = ANY(:i) ORDER BY job_id "
                    "FOR UPDATE NOWAIT"
                ),
                {"i": list(batch)},
            ).all()
            lockable.append(len(locked) == len(batch))

    late = Lateness(timedelta(seconds=60), timedelta(hours=1), timedelta(hours=1))
    reconciler = Reconciler(sessions, send, lambda c, d: None, model, late, batch=2)

    assert reconciler.run_once() == 5
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(j for b in batches for j in b) == sorted(ids)
    assert lockable == [True, True, True]
    assert reconciler.run_once() == 0  # all marked sent


def test_a_batch_whose_publish_fails_is_unsent_again(stack: Stack) -> None:
    model = "reconcile-fails"
    sessions = sessions_with_model(stack, model)
    listing_id = f"rf-{uuid.uuid4().hex[:10]}"
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "t", None, None, ["http://x/a.jpg"])]
        )
        jobs.create_jobs(session, [NewJob(job_id, listing_id, model)])

    def broken(batch):  # type: ignore[no-untyped-def]
        raise ConnectionError("broker away")

    now = Lateness(timedelta(0), timedelta(hours=1), timedelta(hours=1))
    with pytest.raises(ConnectionError):
        Reconciler(sessions, broken, lambda c, d: None, model, now).run_once()
    assert query(stack, "SELECT sent_at FROM jobs WHERE job_id = :j", j=job_id) == [
        {"sent_at": None}
    ]
    sent: list[uuid.UUID] = []
    assert Reconciler(sessions, sent.extend, lambda c, d: None, model, now).run_once() == 1
    assert sent == [job_id]


def test_an_attempt_overtaken_by_a_redelivery_writes_nothing_and_reports_no_outcome(
    stack: Stack, sessions, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A superseded attempt used to log and count itself `succeeded` (and a failed one showed
    in Flower as a failure) although it wrote nothing: each job's outcome counted twice."""
    import dataclasses

    from contract.registry import get_spec, load_registry
    from db.engine import make_engine
    from tests import images
    from tests.unit.test_analysis import analyzer as listing_analyzer
    from worker.job_runner import JobRunner
    from worker.outcomes import OutcomeWriter
    from worker.shared_queries import SharedQueries

    photo = images.save(images.product_image("red"), tmp_path / "red.jpg")
    listing_id, job_id = f"st-{uuid.uuid4().hex[:10]}", uuid.uuid4()
    with sessions.begin() as session:
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "a red mug", None, None, [photo.as_uri()])]
        )
        jobs.create_jobs(session, [NewJob(job_id, listing_id, MODEL)])

    def redelivered_meanwhile(shas):  # type: ignore[no-untyped-def]
        # While this attempt analyses (right after its fetch), a redelivery claims the job.
        assert isinstance(claim(sessions, job_id), ClaimedJob)
        return {}

    single = make_sessions(make_engine(stack.database_url, single_statements=True))
    queries = SharedQueries(
        single, model_id=MODEL, worker="w", max_attempts=3, attempt_limit=timedelta(minutes=5)
    )
    analyzer = listing_analyzer(get_spec(load_registry(), "lv-toy"), tmp_path, False)
    analyzer = dataclasses.replace(analyzer, lookup_cached=redelivered_meanwhile)
    runner = JobRunner(sessions, queries, analyzer, OutcomeWriter(sessions), MODEL, "w", 3, 1.0)
    try:
        report = runner.run(job_id)
    finally:
        queries.close()
        runner.writer.close()
        analyzer.service.close()

    assert report.summary == {"listing_id": listing_id, "skipped": "superseded"}
    assert report.retry_in is None
    assert query(stack, "SELECT status, attempts FROM jobs WHERE job_id = :j", j=job_id) == [
        {"status": "running", "attempts": 2}  # the redelivery's attempt holds it
    ]
    assert query(stack, "SELECT 1 FROM results WHERE listing_id = :l", l=listing_id) == []
