"""The listing event (SPEC.md), validated before anything is written or queued."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from db.records import ListingRecord
from worker.errors import FetchError
from worker.fetch import allowed_file_path

MAX_URLS = 12
MAX_URL_LENGTH = 2048


class ListingEvent(BaseModel):
    """One listing as the catalogue sends it; `image_url` is accepted for a single image."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True)

    listing_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    title: str = Field(min_length=1, max_length=500)
    description: str | None = Field(None, max_length=5000)
    image_urls: tuple[str, ...] = Field(min_length=1, max_length=MAX_URLS)
    category: str | None = Field(None, max_length=200)

    @model_validator(mode="before")
    @classmethod
    def _single_image_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "image_url" not in data:
            return data
        if "image_urls" in data:
            raise ValueError("give image_urls or image_url, not both")
        data = dict(data)
        data["image_urls"] = [data.pop("image_url")]
        return data

    def to_record(self) -> ListingRecord:
        """The listing as `db/` stores it (empty optional texts become NULL)."""
        return ListingRecord(
            self.listing_id,
            self.title,
            self.description or None,
            self.category or None,
            list(self.image_urls),
        )


@dataclass(frozen=True)
class Refusal:
    """A line that was not queued, and why, in words that name the field."""

    line: int
    listing_id: str | None
    message: str

    def __str__(self) -> str:
        who = f" ({self.listing_id})" if self.listing_id else ""
        return f"line {self.line}{who}: {self.message}"


def check_urls(event: ListingEvent, file_roots: tuple[Path, ...]) -> str | None:
    """Why an image URL cannot be used (scheme, host, or a file outside LV_FILE_ROOTS), or None."""
    for index, url in enumerate(event.image_urls):
        problem = _url_problem(url, file_roots)
        if problem:
            return f"image_urls.{index}: {problem}"
    return None


def _url_problem(url: str, file_roots: tuple[Path, ...]) -> str | None:
    if len(url) > MAX_URL_LENGTH:
        return f"URL longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        return f"malformed URL ({error})"
    if parts.scheme in ("http", "https"):
        return None if host else f"URL has no host: {url!r}"
    if parts.scheme != "file":
        return f"URL scheme {parts.scheme or 'missing'!r} is not allowed (http, https or file)"
    try:
        allowed_file_path(url, file_roots)
    except FetchError as error:
        return str(error)
    return None


def parse_event(raw: Any, line: int, file_roots: tuple[Path, ...]) -> ListingEvent | Refusal:
    """Validate one decoded JSON value."""
    listing_id = raw.get("listing_id") if isinstance(raw, dict) else None
    listing_id = listing_id if isinstance(listing_id, str) else None
    if not isinstance(raw, dict):
        return Refusal(line, None, "expected a JSON object")
    try:
        event = ListingEvent.model_validate(raw)
    except ValidationError as error:
        return Refusal(line, listing_id, _describe(error))
    problem = check_urls(event, file_roots)
    return Refusal(line, listing_id, problem) if problem else event


def parse_lines(
    lines: Iterable[str], file_roots: tuple[Path, ...], first_line: int = 1
) -> tuple[list[ListingEvent], list[Refusal]]:
    """JSON lines to events; blank lines are skipped, bad lines refused with their number."""
    events: list[ListingEvent] = []
    refused: list[Refusal] = []
    for number, text in enumerate(lines, start=first_line):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            refused.append(Refusal(number, None, f"not valid JSON: {error.msg}"))
            continue
        parsed = parse_event(raw, number, file_roots)
        (refused if isinstance(parsed, Refusal) else events).append(parsed)  # type: ignore[arg-type]
    return events, refused


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "event"
        parts.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
