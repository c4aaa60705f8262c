"""One listing, start to finish, without a database or Celery: fetch, embed, score."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import torch

from contract.errors import TransientError
from db.embeddings import CachedImage
from db.records import ListingImageRecord, ListingRecord, ResultRecord
from worker.fetch import FetchPolicy
from worker.image_fetch import FailedImage, fetch_images
from worker.images import PreparedImage, prepare_images
from worker.inference import EmbedRequest, EmbedResult, InferenceService, Ticket
from worker.scorer import ListingScorer, UsableImages, failed_result

LookupCached = Callable[[Sequence[str]], dict[str, CachedImage]]


@dataclass(frozen=True)
class ListingAnalysis:
    """What one analysis found; `db.records.JobOutcome` is built from it."""

    result: ResultRecord
    images: list[ListingImageRecord]
    new_embeddings: dict[str, list[float]] = field(default_factory=dict)
    batch_size: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: fetch, decode, infer


@dataclass
class ListingAnalyzer:
    """Everything an analysis needs, held warm by the worker process."""

    service: InferenceService
    scorer: ListingScorer
    policy: FetchPolicy
    max_pixels: int
    executor: Executor
    lookup_cached: LookupCached
    model_timeout: float

    def analyze(
        self, listing: ListingRecord, deadline: float | None = None, ticket: Ticket | None = None
    ) -> ListingAnalysis:
        """Score `listing`; raises `TransientError` when it is worth trying again later, and
        when the attempt's `deadline` (monotonic seconds: LV_TASK_TIME_LIMIT from its claim)
        passes before the model has answered. `ticket`: the job announced itself to the
        batcher already (from its delivery on); else it is announced here."""
        if ticket is not None:
            return self._analyze(listing, ticket, deadline)
        with self.service.coming() as own:
            return self._analyze(listing, own, deadline)

    def _model_wait(self, deadline: float | None) -> float:
        return model_wait(deadline, self.model_timeout)

    def _analyze(
        self, listing: ListingRecord, ticket: Ticket, deadline: float | None
    ) -> ListingAnalysis:
        started = time.monotonic()
        fetched = fetch_images(
            listing.image_urls, self.policy, self.executor, deadline, self.service.pool_fetch
        )
        cached = self.lookup_cached([f.sha256 for f in fetched if not isinstance(f, FailedImage)])
        got = time.monotonic()
        info = self.service.backend.info
        prepared = prepare_images(
            fetched,
            cached,
            preprocess=self.service.preprocess,
            max_pixels=self.max_pixels,
            draft_size=max(info.image_size, 256),
            executor=self.executor,
            encode=self.service.encoded,
            decode=self.service.pool_decode,
        )
        decoded = time.monotonic()
        seconds = {"fetch": got - started, "decode": decoded - got}
        usable = [p for p in prepared if isinstance(p, PreparedImage)]
        if not usable:
            return _all_failed(prepared, seconds)
        fresh = [p for p in usable if p.pixels is not None]
        texts = (listing.text,) if self.scorer.scores_text else ()
        request = EmbedRequest(
            tuple(p.pixels for p in fresh if p.pixels is not None),
            texts,
            tuple(p.facts.sha256 for p in fresh),
        )
        embedded = self.service.embed(request, self._model_wait(deadline), ticket)
        seconds["infer"] = time.monotonic() - decoded  # the batch's wait and its model calls
        errors = embedded.errors or (None,) * len(fresh)
        new_rows = {
            p.facts.sha256: row
            for p, row, error in zip(fresh, embedded.image_embeddings, errors, strict=True)
            if error is None
        }
        if embedded.errors:  # JPEGs decoded in the batch: their measures, or why they failed
            prepared = settle_device_decoded(prepared, fresh, embedded)
            usable = [p for p in prepared if isinstance(p, PreparedImage)]
            if not usable:
                return _all_failed(prepared, seconds)
        failed = [p for p in prepared if isinstance(p, FailedImage)]
        records = image_records(prepared)
        images = UsableImages(
            [p.position for p in usable],
            [p.facts.sha256 for p in usable],
            torch.stack([_vector(p, new_rows) for p in usable]),
        )
        similarity = self.scorer.similarity(images, embedded.text_embeddings[0]) if texts else None
        result = self.scorer.result(listing, images, failed, similarity)
        new_embeddings = {sha: row.tolist() for sha, row in new_rows.items()}
        return ListingAnalysis(result, records, new_embeddings, embedded.batch_units, seconds)


def model_wait(deadline: float | None, limit: float) -> float:
    """How long a request may wait for the model: `limit` (LV_TASK_TIME_LIMIT), or what is
    left of the attempt's `deadline` (monotonic seconds); raises once nothing is left."""
    if deadline is None:
        return limit
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransientError(
            f"the attempt ran past LV_TASK_TIME_LIMIT ({limit:g}s) before its images reached "
            "the model"
        )
    return min(limit, left)


def _all_failed(
    prepared: Sequence[PreparedImage | FailedImage], seconds: dict[str, float]
) -> ListingAnalysis:
    failed = [p for p in prepared if isinstance(p, FailedImage)]
    result = failed_result(failed, len(prepared))
    return ListingAnalysis(result, image_records(prepared), seconds=seconds)


def settle_device_decoded(
    prepared: Sequence[PreparedImage | FailedImage],
    sent: Sequence[PreparedImage],
    embedded: EmbedResult,
) -> list[PreparedImage | FailedImage]:
    """`prepared` after the batch decoded the JPEGs in `sent` on the device: each one's blur
    and brightness in its facts, or a `FailedImage` with the decoder's reason."""
    settled: dict[int, PreparedImage | FailedImage] = {}
    for image, quality, error in zip(sent, embedded.qualities, embedded.errors, strict=True):
        if error is not None:
            settled[image.position] = FailedImage(image.position, image.url, error)
        elif quality is not None:
            facts = replace(image.facts, blur=quality.blur, brightness=quality.brightness)
            settled[image.position] = replace(image, facts=facts)
    return [settled.get(p.position, p) for p in prepared]


def _vector(image: PreparedImage, new_rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The image's embedding: just computed, else the stored one."""
    fresh = new_rows.get(image.facts.sha256)
    if fresh is not None:
        return fresh
    if image.cached_embedding is None:
        raise RuntimeError(f"image {image.facts.sha256} has neither new nor stored embedding")
    return torch.from_numpy(image.cached_embedding)


def image_records(prepared: Sequence[PreparedImage | FailedImage]) -> list[ListingImageRecord]:
    """What `listing_images` stores of each position: its content, or its error."""
    return [
        ListingImageRecord(p.position, p.url, error=p.error)
        if isinstance(p, FailedImage)
        else ListingImageRecord(
            p.position,
            p.url,
            facts=p.facts,
            etag=p.validators.etag if p.validators else None,
            last_modified=p.validators.last_modified if p.validators else None,
        )
        for p in sorted(prepared, key=lambda p: p.position)
    ]
