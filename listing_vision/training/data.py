"""What `train` learns from: image/text pairs, contrastive or labelled match/mismatch.

Two formats, told apart by their first character (docs/training.md):
- a CSV with the columns `image,text` (paths relative to the CSV unless absolute) and
  optionally `label` (`match` or `mismatch`): the operator's own files, so a bad row (a missing
  or undecodable image, an empty text, another label) refuses the whole file, naming its line;
- labelled listings (SPEC.md: JSON lines of listing events plus `label`), checked by the same
  reader as `calibrate`. Their images are fetched once through the worker's fetch guard and
  decoder into a content-addressed cache under `LV_HOME`; a listing none of whose images can
  be used is left out and counted, as `calibrate` does (catalogue URLs go stale).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from contract.errors import ListingError, TransientError, one_line
from contract.settings import Settings
from listing_vision.toolkit.labelled import (
    LabelledError,
    LabelledListing,
    LabelledSet,
    read_labelled,
)
from listing_vision.training.errors import TrainingError
from worker.decode import decode_image
from worker.fetch import FetchedImage, FetchPolicy, fetch_image
from worker.runtime import fetch_policy

LABELS = {"match": False, "mismatch": True}  # label -> mismatch
_SHOWN = 10  # bad lines named in one error
_DECODE_THREADS = max(2, min(8, os.cpu_count() or 2))
_DRAFT = 256  # decoded at least this large per side: enough for any CLIP input size


@dataclass(frozen=True)
class Example:
    """One image/text pair (a listing: several images, its score the best image's)."""

    source: str  # where it came from ("pairs.csv:3"), for messages
    images: tuple[Path, ...]  # local files, resolved
    text: str
    mismatch: bool | None  # None: a contrastive pair (the batch's other texts are its negatives)


@dataclass(frozen=True)
class TrainingData:
    """A training or validation file as read: its examples, in file order."""

    path: Path
    sha256: str
    examples: list[Example]
    left_out: list[str] = field(default_factory=list)  # listings without a usable image, why

    @property
    def labelled(self) -> bool:
        return self.examples[0].mismatch is not None

    @property
    def kind(self) -> str:
        return "labelled pairs" if self.labelled else "contrastive pairs"


def read_training_data(path: Path, settings: Settings) -> TrainingData:
    """Read a CSV of pairs or a labelled listings file; `TrainingError` names every bad line."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise TrainingError(f"cannot read {path}: {error.strerror}") from None
    sha256 = hashlib.sha256(content).hexdigest()
    if content.lstrip()[:1] == b"{":
        return _labelled_listings(path, content, sha256, settings)
    return TrainingData(path, sha256, _csv_examples(path, content, settings.max_image_pixels))


def _csv_examples(path: Path, content: bytes, max_pixels: int) -> list[Example]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TrainingError(f"{path}: not UTF-8 text (byte {error.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = set(reader.fieldnames or ())
    if not {"image", "text"} <= columns:
        raise TrainingError(
            f"{path}:1: the header must name the columns image and text (and optionally label)"
        )
    labelled = "label" in columns
    examples: list[Example] = []
    bad: list[str] = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            parsed = _csv_row(row, where, path.parent, labelled)
            if isinstance(parsed, str):
                bad.append(parsed)
            else:
                examples.append(parsed)
    except csv.Error as error:
        bad.append(f"{path}:{reader.line_num}: not valid CSV: {error}")
    bad += _undecodable(examples, max_pixels)
    _refuse(path, bad)
    if len(examples) < 2:
        raise TrainingError(f"{path}: {len(examples)} pair(s); training needs at least two")
    return examples


def _csv_row(row: dict[str, str | None], where: str, base: Path, labelled: bool) -> Example | str:
    image, text = (row.get("image") or "").strip(), (row.get("text") or "").strip()
    if not image or not text:
        return f"{where}: image and text are both required"
    mismatch = None
    if labelled:
        label = (row.get("label") or "").strip().lower()
        if label not in LABELS:
            return f'{where}: label must be "match" or "mismatch", not {label!r}'
        mismatch = LABELS[label]
    file = Path(image).expanduser()
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        return f"{where}: no such image {file}"
    return Example(where, (file.resolve(),), text, mismatch)


def _undecodable(examples: Sequence[Example], max_pixels: int) -> list[str]:
    """Each distinct image decoded once, with the worker's decoder and limits: a bad one is
    found now, naming its line, not halfway through an epoch."""
    first_use: dict[Path, str] = {}
    for example in examples:
        first_use.setdefault(example.images[0], example.source)

    def check(file: Path) -> str | None:
        try:
            decode_image(file.read_bytes(), max_pixels=max_pixels, draft_size=_DRAFT)
        except (ListingError, OSError) as error:
            return f"{first_use[file]}: image {file}: {one_line(error)}"
        return None

    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        return [error for error in pool.map(check, first_use) if error]


def _refuse(path: Path, bad: list[str]) -> None:
    if not bad:
        return
    shown = "\n  ".join(bad[:_SHOWN])
    more = f"\n  … and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    raise TrainingError(f"{path}: {len(bad)} bad line(s):\n  {shown}{more}")


def _labelled_listings(path: Path, content: bytes, sha256: str, settings: Settings) -> TrainingData:
    try:
        labelled = read_labelled(path, settings.file_roots)
    except LabelledError as error:
        raise TrainingError(str(error)) from None
    cache = settings.home / "cache" / "train-images"
    cache.mkdir(parents=True, exist_ok=True)
    fetched = _fetch_all(_urls(labelled), fetch_policy(settings), cache, settings.max_image_pixels)
    examples: list[Example] = []
    left_out: list[str] = []
    for line, item in _numbered(content, labelled):
        event = item.event
        usable = tuple(p for url in event.image_urls if isinstance(p := fetched[url], Path))
        if not usable:
            reasons = "; ".join(str(fetched[url]) for url in event.image_urls)
            left_out.append(f"line {line} ({event.listing_id}): {reasons}")
            continue
        where = f"{path}:{line} ({event.listing_id})"
        examples.append(Example(where, usable, event.to_record().text, item.mismatch))
    if not examples:
        raise TrainingError(f"{path}: no listing has a usable image: {left_out[0]}")
    return TrainingData(path, sha256, examples, left_out)


def _numbered(content: bytes, labelled: LabelledSet) -> Iterable[tuple[int, LabelledListing]]:
    """Listings with their line numbers (blank lines skipped, as the reader skips them)."""
    text = content.decode("utf-8", "replace")
    lines = [number for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    return zip(lines, labelled.listings, strict=True)


def _urls(labelled: LabelledSet) -> list[str]:
    return list(dict.fromkeys(url for item in labelled.listings for url in item.event.image_urls))


def _fetch_all(
    urls: Sequence[str], policy: FetchPolicy, cache: Path, max_pixels: int
) -> dict[str, Path | str]:
    """Each URL fetched and decoded once: its cached file, or why it cannot be used."""

    def one(url: str) -> Path | str:
        try:
            fetched = fetch_image(url, policy)
            assert isinstance(fetched, FetchedImage)  # an unconditional request
            data = fetched.data
            decode_image(data, max_pixels=max_pixels, draft_size=_DRAFT)
        except (ListingError, TransientError) as error:
            return one_line(error)
        file = cache / hashlib.sha256(data).hexdigest()
        if not file.exists():
            partial = file.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(data)
            partial.replace(file)
        return file.resolve()

    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        return dict(zip(urls, pool.map(one, urls), strict=True))


def split_validation(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out about `fraction` of the examples, whole images at a time: every pair of an image
    lands on one side, so validation never scores an image the model trained on."""
    groups: dict[Path, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.images[0], []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    wanted = max(1, round(fraction * len(examples)))
    validation: list[Example] = []
    for key in keys:
        if len(validation) >= wanted:
            break
        validation += groups.pop(key)
    training = [example for group in groups.values() for example in group]
    return training, validation


def check_usable(examples: Sequence[Example], role: str) -> None:
    """Training and validation each need both labels (labelled pairs), or two pairs with
    different texts (contrastive: one text is the other's negative)."""
    if not examples or examples[0].mismatch is None:
        if len({e.text for e in examples}) < 2:
            raise TrainingError(
                f"the {role} data holds {len(examples)} pair(s) and needs at least two with "
                "different texts"
            )
        return
    mismatches = sum(bool(e.mismatch) for e in examples)
    if not mismatches or mismatches == len(examples):
        raise TrainingError(
            f"the {role} data holds {len(examples)} labelled pair(s), {mismatches} of them "
            "mismatches: it needs both matches and mismatches"
        )
