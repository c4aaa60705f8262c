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
    """One of a listing's image URLs and what fetching it gave: facts, or an error."""

    position: int
    url: str
    facts: ImageFacts | None = None
    error: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    """The row of `results` for one (listing, model)."""

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


@dataclass(frozen=True)
class JobOutcome:
    """Everything one finished job writes, in one transaction.

    `attempt` fences the write: only the attempt that holds the job may finish it.
    `listing_updated_at` is the listing version analysed: an older one never replaces a newer.
    """

    job_id: uuid.UUID
    listing_id: str
    model_id: str
    job_status: str  # "succeeded", "failed" or "dead"
    result: ResultRecord
    attempt: int
    listing_updated_at: datetime | None
    images: list[ListingImageRecord] = field(default_factory=list)
    new_embeddings: dict[str, list[float]] = field(default_factory=dict)
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
