"""From a listing's image embeddings (and its text's) to its result row: the one place both a
single job and a run's chunk turn vectors into a verdict."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from contract.errors import redacted
from contract.thresholds import ThresholdSource
from db.records import ListingRecord, ResultRecord
from worker.backends.base import ModelInfo
from worker.categories import CategoryIndex
from worker.image_fetch import FailedImage
from worker.scoring import image_text_similarity

_MAX_ERROR = 500


@dataclass(frozen=True)
class UsableImages:
    """A listing's usable images in position order: where each sits, its content, its vector."""

    positions: list[int]
    shas: list[str]
    vectors: torch.Tensor  # (len(positions), dim), unit length


@dataclass(frozen=True)
class Similarity:
    """Image-text agreement of the best image, and which usable image that is (an index)."""

    value: float
    best: int


def text_sha256(listing: ListingRecord) -> str:
    """What the scored text was: a listing whose text and images are unchanged keeps its score."""
    return hashlib.sha256(listing.text.encode()).hexdigest()


@dataclass(frozen=True)
class ListingScorer:
    """The warm model's facts, its category index and its thresholds (the registry's, or those
    `calibrate` recorded: `worker.thresholds`)."""

    info: ModelInfo
    categories: CategoryIndex | None
    thresholds: ThresholdSource

    @property
    def scores_text(self) -> bool:
        """False for image-only models (DINOv2): rows carry no similarity or categories."""
        return self.info.has_text and self.categories is not None

    def similarity(self, images: UsableImages, text_embedding: torch.Tensor) -> Similarity:
        """The best image's agreement with the text (cosine, or sigmoid for SigLIP-style)."""
        scores = image_text_similarity(images.vectors, text_embedding, self.info)
        best = int(torch.argmax(scores))
        return Similarity(float(scores[best]), best)

    def reused_similarity(
        self, listing: ListingRecord, images: UsableImages, previous: ResultRecord | None
    ) -> Similarity | None:
        """The stored similarity, when it was computed from this very text and these images."""
        if previous is None or previous.status != "ok" or previous.similarity is None:
            return None
        if previous.text_sha256 != text_sha256(listing) or previous.image_shas != images.shas:
            return None
        if previous.best_image not in images.positions:
            return None
        return Similarity(previous.similarity, images.positions.index(previous.best_image))

    def result(
        self,
        listing: ListingRecord,
        images: UsableImages,
        failed: list[FailedImage],
        similarity: Similarity | None,
    ) -> ResultRecord:
        """The `ok` row of one listing (see `results`)."""
        return self.results([Scored(listing, images, failed, similarity)])[0]

    def results(self, items: Sequence[Scored]) -> list[ResultRecord]:
        """The `ok` rows: similarity and verdict, categories of the best image, the claim
        judged; an `error` naming the images that could not be used, if any. The categories of
        every item are ranked in one matrix product."""
        found = [self._found(item) for item in items]
        if not self.scores_text or self.categories is None:
            return found
        judged = [
            (i, item.similarity) for i, item in enumerate(items) if item.similarity is not None
        ]
        if not judged:
            return found
        thresholds = self.thresholds.current()
        rows = [items[i].images.vectors.numpy()[similarity.best] for i, similarity in judged]
        best = torch.from_numpy(np.stack(rows))
        claims = [items[i].listing.category for i, _ in judged]
        verdicts = self.categories.judge(best, self.info.logit_scale, claims)
        for (i, similarity), verdict in zip(judged, verdicts, strict=True):
            found[i] = replace(
                found[i],
                similarity=similarity.value,
                is_match=thresholds.is_match(similarity.value, items[i].listing.category),
                top_category=verdict.top[0].label,
                categories=[{"label": c.label, "score": c.score} for c in verdict.top],
                category_mismatch=verdict.mismatch,
                best_image=items[i].images.positions[similarity.best],
            )
        return found

    def _found(self, item: Scored) -> ResultRecord:
        images = item.images
        total = len(images.positions) + len(item.failed)
        return ResultRecord(
            "ok",
            failure_summary(item.failed, total) if item.failed else None,
            best_image=images.positions[0],
            images_total=total,
            images_failed=len(item.failed),
            text_sha256=text_sha256(item.listing),
            image_shas=images.shas,
        )


@dataclass(frozen=True)
class Scored:
    """What a listing's row is made of: its usable and failed images, and its similarity
    (None for a model without text)."""

    listing: ListingRecord
    images: UsableImages
    failed: list[FailedImage]
    similarity: Similarity | None


def failed_result(failed: list[FailedImage], total: int) -> ResultRecord:
    """The `failed` row of a listing none of whose images could be used."""
    return ResultRecord(
        "failed", failure_summary(failed, total), images_total=total, images_failed=len(failed)
    )


def failure_summary(failed: list[FailedImage], total: int) -> str:
    """One line: the single image's error, or which of several images failed and why."""
    if total == 1 and failed:
        return failed[0].error[:_MAX_ERROR]
    details = "; ".join(f"image {f.position + 1} ({_short(f.url)}): {f.error}" for f in failed)
    head = (
        "all images failed" if len(failed) == total else f"{len(failed)} of {total} images failed"
    )
    return f"{head}: {details}"[:_MAX_ERROR]


def _short(url: str, limit: int = 80) -> str:
    url = redacted(url)
    return url if len(url) <= limit else url[: limit - 1] + "…"
