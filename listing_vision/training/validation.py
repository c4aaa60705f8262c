"""How well a model separates matches from mismatches on the validation data, and the threshold
that does it best, measured as `calibrate` measures: the pairs scored by the worker's own
analysis code (`toolkit.evaluate`, the model loaded through the registry's backend, so the
saved model is checked to load as the registry will load it), then the best-F1 threshold and
ROC AUC of `toolkit.metrics`.

Contrastive validation pairs have no mismatches of their own: each image is also paired with
the text of another pair (the next one with a different text) as a mismatch. Such negatives
are easier than real sellers' mistakes, so that threshold is a starting point (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contract.registry import ModelSpec
from contract.settings import Settings
from db.records import ListingRecord
from listing_vision.toolkit.evaluate import evaluate
from listing_vision.toolkit.metrics import Detection, best_threshold, roc_auc
from listing_vision.training.data import Example
from listing_vision.training.errors import TrainingError


@dataclass(frozen=True)
class ValidationPairs:
    """Validation examples as listings to score, with their truth."""

    listings: list[ListingRecord]
    mismatch: list[bool]
    synthetic_negatives: bool  # mismatches made by pairing images with other pairs' texts
    folders: tuple[Path, ...]  # where the images are: the file roots of the scoring


@dataclass(frozen=True)
class Separation:
    """One model on the validation pairs: ROC AUC and mismatch detection at its best-F1
    threshold (`best.threshold`)."""

    model_id: str
    scored: int
    mismatches: int
    unscored: int  # pairs whose images the worker's code could not use
    roc_auc: float | None
    best: Detection

    @property
    def threshold(self) -> float:
        """The best-F1 threshold (`measure` never returns one without)."""
        assert self.best.threshold is not None
        return self.best.threshold


def validation_pairs(examples: Sequence[Example]) -> ValidationPairs:
    """The listings `evaluate` scores: each example's images (local files) against its text."""
    folders = tuple(sorted({path.parent for e in examples for path in e.images}))
    if examples[0].mismatch is not None:
        listings = [_listing(n, e.images, e.text) for n, e in enumerate(examples)]
        return ValidationPairs(listings, [bool(e.mismatch) for e in examples], False, folders)
    matches = [_listing(n, e.images, e.text) for n, e in enumerate(examples)]
    negatives = [
        _listing(len(examples) + n, e.images, _other_text(examples, n))
        for n, e in enumerate(examples)
    ]
    truth = [False] * len(matches) + [True] * len(negatives)
    return ValidationPairs(matches + negatives, truth, True, folders)


def measure(settings: Settings, spec: ModelSpec, pairs: ValidationPairs) -> Separation:
    """Score the pairs with `spec`'s model as a worker would and find its best threshold."""
    local = settings.model_copy(update={"file_roots": pairs.folders})
    evaluation = evaluate(local, spec, pairs.listings)
    judged = [
        (scored.similarity, mismatch)
        for scored, mismatch in zip(evaluation.listings, pairs.mismatch, strict=True)
        if scored.similarity is not None
    ]
    scores = [score for score, _ in judged]
    labels = [mismatch for _, mismatch in judged]
    best = best_threshold(scores, labels)
    if best is None or best.threshold is None or all(labels) or not any(labels):
        raise TrainingError(
            f"{spec.model_id} scored {len(judged)} of {len(pairs.listings)} validation pairs, "
            f"{sum(labels)} of them mismatches: no threshold can be calibrated on them"
        )
    return Separation(
        spec.model_id,
        len(judged),
        sum(labels),
        len(pairs.listings) - len(judged),
        roc_auc(scores, labels),
        best,
    )


def _listing(number: int, images: Sequence[Path], text: str) -> ListingRecord:
    urls = [path.as_uri() for path in images]
    return ListingRecord(f"validation-{number}", text, None, None, urls)


def _other_text(examples: Sequence[Example], index: int) -> str:
    own = examples[index].text
    for step in range(1, len(examples)):
        other = examples[(index + step) % len(examples)].text
        if other != own:
            return other
    raise TrainingError("every validation pair has the same text: no mismatch can be made")
