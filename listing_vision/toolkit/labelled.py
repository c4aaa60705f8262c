"""Labelled listings (SPEC.md): listing events plus `"label": "match" | "mismatch"` and
optionally `"true_category"`, one JSON object per line.

The whole file is refused when any line is bad (naming each line and field): a calibration
derived from whatever lines happened to parse would be recorded as derived from the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.labels import normalise_label
from producer.events import ListingEvent, Refusal, parse_event

LABELS = ("match", "mismatch")
MAX_CATEGORY = 200
_SHOWN_REFUSALS = 10


class LabelledError(ValueError):
    """The labelled file cannot be used; the message names the lines and fields."""


@dataclass(frozen=True)
class LabelledListing:
    """One listing and the truth about it."""

    event: ListingEvent
    mismatch: bool
    true_category: str | None  # normalised

    @property
    def claimed(self) -> str | None:
        """The seller's category, normalised: the key of a per-category threshold."""
        return normalise_label(self.event.category) if self.event.category else None


@dataclass(frozen=True)
class LabelledSet:
    """A labelled file: where it is, its content's SHA-256, its listings in file order."""

    path: Path
    sha256: str
    listings: list[LabelledListing]

    @property
    def mismatches(self) -> int:
        return sum(item.mismatch for item in self.listings)


def read_labelled(path: Path, file_roots: tuple[Path, ...]) -> LabelledSet:
    """Read and check a labelled file; `LabelledError` if it is missing, empty or has a bad
    line (image URLs are judged as `enqueue` judges them, `file://` under `LV_FILE_ROOTS`)."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise LabelledError(f"cannot read labelled listings {path}: {error.strerror}") from None
    listings: list[LabelledListing] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        parsed = _parse_line(line, number, file_roots)
        if isinstance(parsed, Refusal):
            refused.append(parsed)
        elif parsed.event.listing_id in seen:
            refused.append(Refusal(number, parsed.event.listing_id, "listing_id: listed twice"))
        else:
            seen.add(parsed.event.listing_id)
            listings.append(parsed)
    if refused:
        shown = "\n  ".join(str(r) for r in refused[:_SHOWN_REFUSALS])
        more = (
            f"\n  … and {len(refused) - _SHOWN_REFUSALS} more"
            if len(refused) > _SHOWN_REFUSALS
            else ""
        )
        raise LabelledError(f"{path}: {len(refused)} bad line(s):\n  {shown}{more}")
    if not listings:
        raise LabelledError(f"{path} holds no labelled listings")
    return LabelledSet(path, hashlib.sha256(content).hexdigest(), listings)


def _parse_line(line: str, number: int, file_roots: tuple[Path, ...]) -> LabelledListing | Refusal:
    try:
        raw: Any = json.loads(line)
    except json.JSONDecodeError as error:
        return Refusal(number, None, f"not valid JSON: {error.msg}")
    event = parse_event(raw, number, file_roots)
    if isinstance(event, Refusal):
        return event
    label = raw.get("label")
    if label not in LABELS:
        return Refusal(number, event.listing_id, 'label: must be "match" or "mismatch"')
    truth = raw.get("true_category")
    if truth is not None and (not isinstance(truth, str) or len(truth) > MAX_CATEGORY):
        return Refusal(number, event.listing_id, "true_category: a text of at most 200 characters")
    return LabelledListing(
        event, label == "mismatch", normalise_label(truth) if truth and truth.strip() else None
    )
