"""What is stored about a set of listings for one model, read in three statements whatever
their number: the listings, their image lists (with each image's facts and this model's
embedding, where it has one), and their current results. A run's chunk decides from it what to
redo."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from db.arrays import any_ids
from db.embeddings import CachedImage, parse_vector, vector_bytes
from db.records import ImageFacts, ListingRecord, ResultRecord
from db.schema import Embedding, Image, Listing, ListingImage, Result


@dataclass(frozen=True)
class StoredImage:
    """One position of a listing's image list as last fetched: its content, or its error; and
    what this model knows of that content (None: not embedded by it)."""

    position: int
    url: str
    sha256: str | None
    error: str | None
    etag: str | None
    last_modified: str | None
    cached: CachedImage | None = None


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
    """The stored listings among `listing_ids` (missing ones are left out)."""
    ids = list(listing_ids)
    listings = {
        row.listing_id: ListingRecord(
            row.listing_id,
            row.title,
            row.description,
            row.category,
            list(row.image_urls),
            row.updated_at,
        )
        for row in session.execute(
            select(
                Listing.listing_id,
                Listing.title,
                Listing.description,
                Listing.category,
                Listing.image_urls,
                Listing.updated_at,
            ).where(Listing.listing_id == any_ids(ids), *_key_range(Listing.listing_id, ids))
        )
    }
    images = _images(session, ids, model_id)
    results = _results(session, ids, model_id)
    return {
        listing_id: StoredListing(listing, images[listing_id], results.get(listing_id))
        for listing_id, listing in listings.items()
    }


def _key_range(column: Any, ids: list[str]) -> tuple[Any, ...]:
    """The ids' bounds as well: a run's chunk is a keyset range, and the planner then scans that
    range of the primary key instead of the whole table."""
    if not ids:
        return ()
    return (column >= min(ids), column <= max(ids))


def _images(session: Session, ids: list[str], model_id: str) -> dict[str, list[StoredImage]]:
    embedded = and_(Embedding.sha256 == ListingImage.sha256, Embedding.model_id == model_id)
    rows = session.execute(
        select(
            ListingImage.listing_id,
            ListingImage.position,
            ListingImage.url,
            ListingImage.sha256,
            ListingImage.error,
            ListingImage.etag,
            ListingImage.last_modified,
            vector_bytes(Embedding.embedding).label("embedding"),
            Image.width,
            Image.height,
            Image.format,
            Image.bytes,
            Image.blur,
            Image.brightness,
        )
        .outerjoin(Embedding, embedded)
        .outerjoin(Image, Image.sha256 == ListingImage.sha256)
        .where(ListingImage.listing_id == any_ids(ids), *_key_range(ListingImage.listing_id, ids))
        .order_by(ListingImage.listing_id, ListingImage.position)
    )
    images: dict[str, list[StoredImage]] = defaultdict(list)
    for row in rows:
        cached = None
        if row.embedding is not None and row.width is not None:
            facts = ImageFacts(
                row.sha256, row.width, row.height, row.format, row.bytes, row.blur, row.brightness
            )
            cached = CachedImage(facts, parse_vector(row.embedding))
        images[row.listing_id].append(
            StoredImage(
                row.position, row.url, row.sha256, row.error, row.etag, row.last_modified, cached
            )
        )
    return images


def _results(session: Session, ids: list[str], model_id: str) -> dict[str, ResultRecord]:
    columns = (
        Result.listing_id,
        Result.status,
        Result.error,
        Result.similarity,
        Result.is_match,
        Result.top_category,
        Result.categories,
        Result.category_mismatch,
        Result.best_image,
        Result.images_total,
        Result.images_failed,
        Result.text_sha256,
        Result.image_shas,
    )
    rows = session.execute(
        select(*columns).where(
            Result.listing_id == any_ids(ids),
            Result.model_id == model_id,
            *_key_range(Result.listing_id, ids),
        )
    )
    return {
        row.listing_id: ResultRecord(
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
        for row in rows
    }
