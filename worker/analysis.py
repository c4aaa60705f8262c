"""One listing, start to finish, without a database or Celery: fetch, embed, score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from db.embeddings import CachedImage
from db.records import ListingImageRecord, ListingRecord, ResultRecord
from worker.categories import CategoryIndex
from worker.fetch import FetchPolicy
from worker.images import (
    FailedImage,
    FetchedBytes,
    PreparedImage,
    fetch_images,
    prepare_images,
)
from worker.inference import EmbedRequest, InferenceService
from worker.scoring import TOP_CATEGORIES, image_text_similarity

LookupCached = Callable[[Sequence[str]], dict[str, CachedImage]]
_MAX_ERROR = 500


@dataclass(frozen=True)
class ListingAnalysis:
    """What one analysis found; `db.records.JobOutcome` is built from it."""

    result: ResultRecord
    images: list[ListingImageRecord]
    new_embeddings: dict[str, list[float]] = field(default_factory=dict)
    batch_size: int | None = None


@dataclass
class ListingAnalyzer:
    """Everything an analysis needs, held warm by the worker process."""

    service: InferenceService
    categories: CategoryIndex | None
    threshold: float | None
    policy: FetchPolicy
    max_pixels: int
    executor: Executor
    lookup_cached: LookupCached
    model_timeout: float

    def analyze(self, listing: ListingRecord) -> ListingAnalysis:
        """Score `listing`; raises `TransientError` when it is worth trying again later."""
        fetched = fetch_images(listing.image_urls, self.policy, self.executor)
        cached = self.lookup_cached([f.sha256 for f in fetched if isinstance(f, FetchedBytes)])
        info = self.service.backend.info
        prepared = prepare_images(
            fetched,
            cached,
            preprocess=self.service.backend.preprocess,
            max_pixels=self.max_pixels,
            draft_size=max(info.image_size, 256),
            executor=self.executor,
        )
        usable = [p for p in prepared if isinstance(p, PreparedImage)]
        failed = [p for p in prepared if isinstance(p, FailedImage)]
        records = _image_records(prepared)
        if not usable:
            error = _failure_summary(failed, len(prepared))
            result = ResultRecord(
                "failed", error, images_total=len(prepared), images_failed=len(failed)
            )
            return ListingAnalysis(result, records)
        return self._score(listing, usable, failed, records)

    def _score(
        self,
        listing: ListingRecord,
        usable: list[PreparedImage],
        failed: list[FailedImage],
        records: list[ListingImageRecord],
    ) -> ListingAnalysis:
        info = self.service.backend.info
        fresh = [p for p in usable if p.pixels is not None]
        texts = (listing.text,) if info.has_text else ()
        request = EmbedRequest(
            tuple(p.pixels for p in fresh if p.pixels is not None),
            texts,
            tuple(p.facts.sha256 for p in fresh),
        )
        embedded = self.service.embed(request, self.model_timeout)
        new_rows = dict(
            zip((p.facts.sha256 for p in fresh), embedded.image_embeddings, strict=True)
        )
        vectors = torch.stack(
            [new_rows.get(p.facts.sha256, _as_tensor(p.cached_embedding)) for p in usable]
        )
        new_embeddings = {sha: row.tolist() for sha, row in new_rows.items()}
        note = _failure_summary(failed, len(usable) + len(failed)) if failed else None
        total, failures = len(usable) + len(failed), len(failed)
        if not info.has_text or self.categories is None:
            result = ResultRecord(
                "ok",
                note,
                best_image=usable[0].position,
                images_total=total,
                images_failed=failures,
            )
            return ListingAnalysis(result, records, new_embeddings, embedded.batch_units)
        similarities = image_text_similarity(vectors, embedded.text_embeddings[0], info)
        best = int(torch.argmax(similarities))
        ranked = self.categories.rank(vectors[best], info.logit_scale)
        mismatch = self.categories.claim_mismatch(
            vectors[best], info.logit_scale, ranked, listing.category
        )
        similarity = float(similarities[best])
        result = ResultRecord(
            status="ok",
            error=note,
            similarity=similarity,
            is_match=None if self.threshold is None else similarity >= self.threshold,
            top_category=ranked[0].label,
            categories=[{"label": c.label, "score": c.score} for c in ranked[:TOP_CATEGORIES]],
            category_mismatch=mismatch,
            best_image=usable[best].position,
            images_total=total,
            images_failed=failures,
        )
        return ListingAnalysis(result, records, new_embeddings, embedded.batch_units)


def _as_tensor(values: list[float] | None) -> torch.Tensor:
    return torch.tensor(values or [], dtype=torch.float32)


def _image_records(prepared: list[PreparedImage | FailedImage]) -> list[ListingImageRecord]:
    return [
        ListingImageRecord(p.position, p.url, error=p.error)
        if isinstance(p, FailedImage)
        else ListingImageRecord(p.position, p.url, facts=p.facts)
        for p in sorted(prepared, key=lambda p: p.position)
    ]


def _failure_summary(failed: list[FailedImage], total: int) -> str:
    """One line: the single image's error, or which of several images failed and why."""
    if total == 1 and failed:
        return failed[0].error[:_MAX_ERROR]
    details = "; ".join(f"image {f.position + 1} ({_short(f.url)}): {f.error}" for f in failed)
    head = (
        "all images failed" if len(failed) == total else f"{len(failed)} of {total} images failed"
    )
    return f"{head}: {details}"[:_MAX_ERROR]


def _short(url: str, limit: int = 80) -> str:
    return url if len(url) <= limit else url[: limit - 1] + "…"
