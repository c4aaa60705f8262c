"""Writes of `images` (what an image is, by content) and `listing_images` (where it is used)."""

from __future__ import annotations

from dataclasses import asdict

from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.records import ListingImageRecord
from db.schema import Image, ListingImage


def insert_image_facts(session: Session, images: list[ListingImageRecord]) -> None:
    """Store each image's facts once per content (true whichever listing shows it).

    Rows are written in SHA-256 order, so concurrent jobs sharing images lock them in the same
    order and cannot deadlock.
    """
    facts = {image.facts.sha256: image.facts for image in images if image.facts is not None}
    if facts:
        rows = [asdict(facts[sha]) for sha in sorted(facts)]
        session.execute(insert(Image).values(rows).on_conflict_do_nothing())


def write_listing_images(
    session: Session, listing_id: str, images: list[ListingImageRecord]
) -> None:
    """Replace the listing's image list: URL, content (SHA-256) or error, per position."""
    if not images:
        return
    statement = insert(ListingImage).values(
        [
            {
                "listing_id": listing_id,
                "position": image.position,
                "url": image.url,
                "sha256": image.facts.sha256 if image.facts else None,
                "error": image.error,
                "checked_at": func.now(),
            }
            for image in images
        ]
    )
    excluded = statement.excluded
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[ListingImage.listing_id, ListingImage.position],
            set_={
                "url": excluded.url,
                "sha256": excluded.sha256,
                "error": excluded.error,
                "checked_at": excluded.checked_at,
            },
        )
    )
    session.execute(
        delete(ListingImage).where(
            ListingImage.listing_id == listing_id, ListingImage.position >= len(images)
        )
    )
