"""Plain data that crosses into `db/`: what a worker found, ready to be written."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ImageFacts:
    """What an image is, by content (stored once per SHA-256)."""

    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    blur: float
    brightness: float


@dataclass(frozen=True)
class ListingImageRecord:
    """One of a listing's image URLs and what fetching it gave: facts, or an error, and the
    validators the server sent (for a later conditional request)."""

    position: int
    url: str
    facts: ImageFacts | None = None
    error: str | None = None
    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    """The row of `results` for one (listing, model).

    `text_sha256` and `image_shas` say what the similarity was computed from (the scored text,
    the usable images in position order): the same inputs give the same similarity.
    """

    status: str  # "ok" or "failed"
    error: str | None = None
    similarity: float | None = None
    is_match: bool | None = None
    top_category: str | None = None
    categories: list[dict[str, Any]] | None = None
    category_mismatch: bool | None = None
    best_image: int | None = None
    images_total: int = 0
    images_failed: int = 0
    text_sha256: str | None = None
    image_shas: list[str] | None = None


@dataclass(frozen=True)
class ListingOutcome:
    """What one analysis of one listing by one model writes, in its job's or chunk's transaction.

    `listing_updated_at` is the listing version analysed: an older one never replaces a newer.
    `images` replaces the listing's image list; empty leaves it as it is (a listing rescored
    from what is stored). `new_embeddings` are image embeddings computed for it (by SHA-256).
    """

    listing_id: str
    model_id: str
    result: ResultRecord
    listing_updated_at: datetime | None
    images: list[ListingImageRecord] = field(default_factory=list)
    new_embeddings: dict[str, list[float]] = field(default_factory=dict)
    job_id: uuid.UUID | None = None


@dataclass(frozen=True)
class JobOutcome:
    """A finished job: its listing's outcome, fenced by the attempt that produced it (only the
    attempt that holds the job may finish it)."""

    job_id: uuid.UUID
    attempt: int
    job_status: str  # "succeeded", "failed" or "dead"
    listing: ListingOutcome
    batch_size: int | None = None


@dataclass(frozen=True)
class ListingRecord:
    """A listing as the catalogue described it in its latest event."""

    listing_id: str
    title: str
    description: str | None
    category: str | None
    image_urls: list[str]
    updated_at: datetime | None = None  # set when read back from the database

    @property
    def text(self) -> str:
        """The text its images are scored against: the title, or "{title}. {description}"."""
        return f"{self.title}. {self.description}" if self.description else self.title
