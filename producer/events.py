"""The listing event (SPEC.md), validated before anything is written or queued."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from contract.urls import url_problem
from db.records import ListingRecord

MAX_URLS = 12


def _usable_url(url: str, info: ValidationInfo) -> str:
    """The image-URL policy, with `LV_FILE_ROOTS` given as validation context. Without a
    context the roots are unknown, so a `file://` URL is left for the producer to judge."""
    file_roots = _context_roots(info)
    if file_roots is None and urlsplit(url).scheme == "file":
        return url
    problem = url_problem(url, file_roots or ())
    if problem:
        raise ValueError(problem)
    return url


def _context_roots(info: ValidationInfo) -> tuple[Path, ...] | None:
    roots: tuple[Path, ...] | None = (info.context or {}).get("file_roots")
    return roots


ImageUrl = Annotated[str, AfterValidator(_usable_url)]


class ListingEvent(BaseModel):
    """One listing as the catalogue sends it; `image_url` is accepted for a single image.

    An instance is valid by construction. `parse_event` (or `model_validate(raw,
    context={"file_roots": roots})`) also judges `file://` URLs against `LV_FILE_ROOTS`; the
    producer then takes the event as it is, and judges only the `file://` URLs of an event built
    without those roots (`ListingEvent(...)`).
    """

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True)

    listing_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    title: str = Field(min_length=1, max_length=500)
    description: str | None = Field(None, max_length=5000)
    image_urls: tuple[ImageUrl, ...] = Field(min_length=1, max_length=MAX_URLS)
    category: str | None = Field(None, max_length=200)
    _judged_roots: tuple[Path, ...] | None = PrivateAttr(default=None)

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

    @model_validator(mode="after")
    def _remember_roots(self, info: ValidationInfo) -> ListingEvent:
        self._judged_roots = _context_roots(info)
        return self

    def file_url_problem(self, file_roots: tuple[Path, ...]) -> str | None:
        """Why a `file://` URL is not allowed under `file_roots`, unless already judged so."""
        if self._judged_roots == file_roots:
            return None
        for index, url in enumerate(self.image_urls):
            problem = url_problem(url, file_roots)
            if problem:
                return f"image_urls.{index}: {problem}"
        return None

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


def parse_event(raw: Any, line: int, file_roots: tuple[Path, ...]) -> ListingEvent | Refusal:
    """Validate one decoded JSON value."""
    listing_id = raw.get("listing_id") if isinstance(raw, dict) else None
    listing_id = listing_id if isinstance(listing_id, str) else None
    if not isinstance(raw, dict):
        return Refusal(line, None, "expected a JSON object")
    try:
        return ListingEvent.model_validate(raw, context={"file_roots": file_roots})
    except ValidationError as error:
        return Refusal(line, listing_id, _describe(error))


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
        if isinstance(parsed, Refusal):
            refused.append(parsed)
        else:
            events.append(parsed)
    return events, refused


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "event"
        parts.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
