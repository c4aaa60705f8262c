"""What is stored about a set of listings for one model, read in a few statements: the listings,
their image lists, and their current results. A run's chunk decides from it what to redo."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.listings import get_listings
from db.records import ListingRecord, ResultRecord
from db.schema import ListingImage, Result


@dataclass(frozen=True)
class StoredImage:
    """One position of a listing's image list as last fetched: its content, or its error."""

    position: int
    url: str
    sha256: str | None
    error: str | None
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class StoredListing:
    """A listing, its image list as last fetched, and its current result for the model."""

    listing: ListingRecord
    images: list[StoredImage]
    result: ResultRecord | None

    def images_current(self) -> bool:
        """True when the stored image list is the listing's current one (same URLs, in order)."""
        return [image.url for image in self.images] == self.listing.image_urls


def load_listings(
    session: Session, listing_ids: Sequence[str], model_id: str
) -> dict[str, StoredListing]:
    """Three statements whatever the number of listings; listings not stored are left out."""
    listings = get_listings(session, listing_ids)
    ids = list(listings)
    images: dict[str, list[StoredImage]] = defaultdict(list)
    for row in session.scalars(
        select(ListingImage)
        .where(ListingImage.listing_id.in_(ids))
        .order_by(ListingImage.listing_id, ListingImage.position)
    ):
        images[row.listing_id].append(
            StoredImage(row.position, row.url, row.sha256, row.error, row.etag, row.last_modified)
        )
    results = {
        row.listing_id: _result_record(row)
        for row in session.scalars(
            select(Result).where(Result.listing_id.in_(ids), Result.model_id == model_id)
        )
    }
    return {
        listing_id: StoredListing(listing, images[listing_id], results.get(listing_id))
        for listing_id, listing in listings.items()
    }


def _result_record(row: Result) -> ResultRecord:
    return ResultRecord(
        status=row.status,
        error=row.error,
        similarity=row.similarity,
        is_match=row.is_match,
        top_category=row.top_category,
        categories=row.categories,
        category_mismatch=row.category_mismatch,
        best_image=row.best_image,
        images_total=row.images_total,
        images_failed=row.images_failed,
        text_sha256=row.text_sha256,
        image_shas=list(row.image_shas) if row.image_shas is not None else None,
    )
