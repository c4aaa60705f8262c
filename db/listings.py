"""Writes and reads of `listings`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.arrays import any_ids
from db.records import ListingRecord
from db.schema import Listing, table_of


def upsert_listings(session: Session, listings: Sequence[ListingRecord]) -> None:
    """Store the latest version of each listing (the last one wins within one call).

    Rows go in listing_id order, the order workers lock listings in: no deadlock.
    """
    latest = {listing.listing_id: listing for listing in listings}
    if not latest:
        return
    ordered = [latest[listing_id] for listing_id in sorted(latest)]
    rows = [
        {
            "listing_id": listing.listing_id,
            "title": listing.title,
            "description": listing.description,
            "category": listing.category,
            "image_urls": listing.image_urls,
        }
        for listing in ordered
    ]
    table = table_of(Listing)
    statement = insert(table)
    excluded = statement.excluded
    # A version is a timestamp that only grows in commit order: now() is when the transaction
    # started, so a producer that started earlier but commits later would stamp an older
    # version over a newer one, and that newer version's result would pass for current.
    newer = func.greatest(func.now(), table.c.updated_at + text("interval '1 microsecond'"))
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["listing_id"],
            set_={
                "title": excluded.title,
                "description": excluded.description,
                "category": excluded.category,
                "image_urls": excluded.image_urls,
                "updated_at": newer,
            },
        ),
        rows,
    )


def get_listing(session: Session, listing_id: str) -> ListingRecord | None:
    """The stored listing, or None."""
    row = session.scalar(select(Listing).where(Listing.listing_id == listing_id))
    return None if row is None else _record(row)


def superseded(session: Session, analysed: Mapping[str, datetime | None]) -> set[str]:
    """The listings that changed after the version analysed (listing_id -> its version).

    Locks their rows (in listing_id order, as every writer does) until commit, so writers of one
    listing's rows take turns and a result from an older version never lands after one from a
    newer version.
    """
    if not analysed:
        return set()
    rows = session.execute(
        select(Listing.listing_id, Listing.updated_at)
        .where(Listing.listing_id.in_(sorted(analysed)))
        .order_by(Listing.listing_id)
        .with_for_update()
    ).all()
    changed = set()
    for listing_id, current in rows:
        version = analysed[listing_id]
        if version is not None and current > version:
            changed.add(listing_id)
    return changed


def get_listings(session: Session, listing_ids: Sequence[str]) -> dict[str, ListingRecord]:
    """The stored listings among `listing_ids`, by id."""
    if not listing_ids:
        return {}
    rows = session.scalars(select(Listing).where(Listing.listing_id == any_ids(listing_ids)))
    return {row.listing_id: _record(row) for row in rows}


def listing_columns(listing: Table) -> list[ColumnElement[Any]]:
    """The columns a `ListingRecord` is built from (`listing_record`), labelled for a join."""
    return [
        listing.c.title.label("l_title"),
        listing.c.description.label("l_description"),
        listing.c.category.label("l_category"),
        listing.c.image_urls.label("l_image_urls"),
        listing.c.updated_at.label("l_updated_at"),
    ]


def listing_record(row: Row[Any]) -> ListingRecord | None:
    """The listing of a row joined with `listing_columns` (None when the join found none)."""
    if row.l_updated_at is None:
        return None
    return ListingRecord(
        row.listing_id,
        row.l_title,
        row.l_description,
        row.l_category,
        list(row.l_image_urls),
        row.l_updated_at,
    )


def _record(row: Listing) -> ListingRecord:
    return ListingRecord(
        row.listing_id,
        row.title,
        row.description,
        row.category,
        list(row.image_urls),
        row.updated_at,
    )


def catalogue_size(session: Session) -> tuple[int, int]:
    """How many listings the catalogue holds, and how many image URLs they name (what a
    reindex would fetch and embed, before deduplication by content)."""
    listings, urls = session.execute(
        select(
            func.count(), func.coalesce(func.sum(func.jsonb_array_length(Listing.image_urls)), 0)
        )
    ).one()
    return int(listings), int(urls)
