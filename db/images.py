"""Writes of `images` (what an image is, by content) and `listing_images` (where it is used)."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.records import ListingImageRecord
from db.schema import Image, ListingImage, table_of


def insert_image_facts(session: Session, images: list[ListingImageRecord]) -> None:
    """Store each image's facts once per content (true whichever listing shows it).

    Rows are written in SHA-256 order, so concurrent jobs sharing images lock them in the same
    order and cannot deadlock.
    """
    facts = {image.facts.sha256: image.facts for image in images if image.facts is not None}
    if facts:
        rows = [vars(facts[sha]) for sha in sorted(facts)]
        session.execute(insert(table_of(Image)).on_conflict_do_nothing(), rows)


def write_listing_images(
    session: Session, images_by_listing: Mapping[str, list[ListingImageRecord]]
) -> None:
    """Replace each listing's image list (URL, content or error, validators, per position), in
    two statements for all of them; listings with no images given are left as they are."""
    lists = {listing_id: images for listing_id, images in images_by_listing.items() if images}
    if not lists:
        return
    rows = [
        {
            "listing_id": listing_id,
            "position": image.position,
            "url": image.url,
            "sha256": image.facts.sha256 if image.facts else None,
            "error": image.error,
            "etag": image.etag,
            "last_modified": image.last_modified,
        }
        for listing_id in sorted(lists)  # the order every writer locks listings in
        for image in lists[listing_id]
    ]
    statement = insert(table_of(ListingImage))
    excluded = statement.excluded
    replaced = {c: excluded[c] for c in ("url", "sha256", "error", "etag", "last_modified")}
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["listing_id", "position"],
            set_={**replaced, "checked_at": func.now()},
        ),
        rows,
    )
    session.execute(
        text(
            "DELETE FROM listing_images li "
            "USING unnest(CAST(:ids AS text[]), CAST(:counts AS int[])) AS kept(listing_id, n) "
            "WHERE li.listing_id = kept.listing_id AND li.position >= kept.n"
        ),
        {"ids": list(lists), "counts": [len(images) for images in lists.values()]},
    )
