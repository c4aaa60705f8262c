"""Listing versions grow in commit order, whatever order the producers started in."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import text

from db.engine import make_sessions
from db.listings import superseded, upsert_listings
from db.records import ListingRecord
from tests.integration.conftest import Stack


def record(listing_id: str, title: str) -> ListingRecord:
    return ListingRecord(listing_id, title, None, None, ["https://example.com/a.jpg"])


def test_a_producer_that_started_first_but_commits_last_stamps_the_newest_version(
    stack: Stack,
) -> None:
    sessions = make_sessions(stack.engine)
    listing_id = f"version-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        upsert_listings(session, [record(listing_id, "v0")])

    early = sessions()
    early.begin()
    early.execute(text("SELECT now()"))  # its transaction (and now()) starts here
    time.sleep(0.05)
    with sessions.begin() as late:  # starts later, commits first
        upsert_listings(late, [record(listing_id, "late")])
    with sessions() as session:
        late_version = session.execute(
            text("SELECT updated_at FROM listings WHERE listing_id = :id"), {"id": listing_id}
        ).scalar_one()

    upsert_listings(early, [record(listing_id, "early")])
    early.commit()
    early.close()

    with sessions.begin() as session:
        title, version = session.execute(
            text("SELECT title, updated_at FROM listings WHERE listing_id = :id"),
            {"id": listing_id},
        ).one()
        assert title == "early"  # the last commit holds the listing
        assert version > late_version  # and the newest version
        # So a result of the "late" content (stamped late_version) is seen as superseded.
        assert superseded(session, {listing_id: late_version}) == {listing_id}


def test_database_connections_probe_a_silent_network_loss(stack: Stack) -> None:
    """Keepalives and a TCP user timeout: a dead peer is noticed in about a minute."""
    with stack.engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        params = raw.info.get_parameters()  # type: ignore[attr-defined]
    assert params.get("keepalives") == "1"
    assert params.get("tcp_user_timeout") == "60000"
