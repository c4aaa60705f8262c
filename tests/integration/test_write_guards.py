"""Guards a mutation probe found untested (issue 14): the change_seq lock, the stale-version
guards (each on its own), and an acknowledgement that waits for the commit."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import text

from db import jobs, listings, results
from db.jobs import ClaimedJob, NewJob
from db.records import JobOutcome, ListingOutcome, ListingRecord, ResultRecord
from tests.integration.conftest import Stack, query, sessions_with_model
from worker.outcomes import OutcomeWriter

pytestmark = pytest.mark.slow
MODEL = "guards-model"
CHANGE_SEQ_LOCK = 7526319372016103793  # the key the change_seq triggers lock (migration 0001)


@pytest.fixture
def sessions(stack: Stack):  # type: ignore[no-untyped-def]
    return sessions_with_model(stack, MODEL)


def new_listing(sessions) -> ListingRecord:  # type: ignore[no-untyped-def]
    listing_id = f"guard-{uuid.uuid4().hex[:10]}"
    with sessions.begin() as session:
        listings.upsert_listings(
            session, [ListingRecord(listing_id, "t", None, None, ["http://x/a.jpg"])]
        )
        stored = listings.get_listing(session, listing_id)
    assert stored is not None
    return stored


def outcome(listing: ListingRecord, similarity: float, version=None) -> ListingOutcome:  # type: ignore[no-untyped-def]
    return ListingOutcome(
        listing_id=listing.listing_id,
        model_id=MODEL,
        result=ResultRecord("ok", similarity=similarity, is_match=True),
        listing_updated_at=version or listing.updated_at,
    )


def similarity(stack: Stack, listing_id: str) -> float | None:
    rows = query(
        stack,
        "SELECT similarity FROM results WHERE listing_id = :l AND model_id = :m",
        l=listing_id,
        m=MODEL,
    )
    return rows[0]["similarity"] if rows else None


def test_result_writers_commit_in_change_seq_order(stack: Stack, sessions) -> None:  # type: ignore[no-untyped-def]
    """(C) Without the trigger's lock, a second writer would commit a larger change_seq while
    the first is still open, and a poller that saw it would skip the first one forever."""
    first, second = new_listing(sessions), new_listing(sessions)
    open_writer = sessions()
    open_writer.begin()
    results.upsert_results(open_writer, [outcome(first, 0.1)])  # holds the lock, not committed

    def write_second() -> None:
        with sessions.begin() as session:
            results.upsert_results(session, [outcome(second, 0.2)])

    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(write_second)
        time.sleep(0.5)
        assert not later.done()  # waits for the open writer, as the lock promises
        assert similarity(stack, second.listing_id) is None
        open_writer.commit()
        open_writer.close()
        later.result(timeout=10)
    seqs = query(
        stack,
        "SELECT listing_id, change_seq FROM results WHERE listing_id IN (:a, :b)",
        a=first.listing_id,
        b=second.listing_id,
    )
    by_listing = {row["listing_id"]: row["change_seq"] for row in seqs}
    assert by_listing[first.listing_id] < by_listing[second.listing_id]


def test_a_result_of_a_superseded_version_is_not_written(stack: Stack, sessions) -> None:  # type: ignore[no-untyped-def]
    """(G, first guard) The listing changed after the analysis: nothing is written, even
    where no row exists yet for the upsert's own guard to protect."""
    listing = new_listing(sessions)
    older = listing.updated_at - timedelta(seconds=5)
    with sessions.begin() as session:
        stale = results.write_listing_outcomes(session, [outcome(listing, 0.3, older)])
    assert stale == {listing.listing_id}
    assert similarity(stack, listing.listing_id) is None


def test_an_older_version_never_replaces_a_newer_result_row(stack: Stack, sessions) -> None:  # type: ignore[no-untyped-def]
    """(G, second guard) The upsert itself keeps the row of the newer version."""
    listing = new_listing(sessions)
    with sessions.begin() as session:
        results.upsert_results(session, [outcome(listing, 0.9)])
        results.upsert_results(
            session, [outcome(listing, 0.1, listing.updated_at - timedelta(seconds=5))]
        )
    assert similarity(stack, listing.listing_id) == pytest.approx(0.9)


def test_an_outcome_is_reported_written_only_after_its_commit(stack: Stack, sessions) -> None:  # type: ignore[no-untyped-def]
    """(D) The task acknowledges its message when `write` returns: that must be after the
    commit, or a crash in between loses the result of an acknowledged job."""
    listing = new_listing(sessions)
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        jobs.create_jobs(session, [NewJob(job_id, listing.listing_id, MODEL)])
        claim = jobs.claim(session, job_id, worker="t", max_attempts=3)
    assert isinstance(claim, ClaimedJob)
    done = JobOutcome(job_id, claim.attempt, "succeeded", outcome(claim.listing, 0.5))
    writer = OutcomeWriter(sessions)
    blocker = sessions()
    blocker.begin()
    blocker.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHANGE_SEQ_LOCK})
    returned = threading.Event()

    def write() -> None:
        writer.write(done, timeout=30)
        returned.set()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.7)
        assert not returned.is_set()  # the commit cannot happen while the lock is held
        assert (
            query(stack, "SELECT status FROM jobs WHERE job_id = :j", j=job_id)[0]["status"]
            == "running"
        )
    finally:
        blocker.rollback()
        blocker.close()
    thread.join(30)
    writer.close()
    assert returned.is_set()
    assert query(stack, "SELECT status FROM jobs WHERE job_id = :j", j=job_id)[0]["status"] == (
        "succeeded"
    )
