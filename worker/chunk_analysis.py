"""A run's chunk: many listings at once, from what is stored, redoing only what changed.

A listing whose stored image list is its current one, and whose images this model has already
embedded, is rescored without a fetch or an image-encoder call (`--refetch` revalidates those
images with conditional requests first). Its similarity is reused when it was computed from the
same text and the same images, else recomputed from a fresh text embedding (texts deduplicated,
one batch). Everything else (a new model, changed images, failed images) is fetched, decoded
and embedded, all of the chunk's images in one request to the batcher. A row whose values come
out the same is not rewritten.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from contract.errors import one_line
from db.embeddings import CachedImage
from db.listing_state import StoredImage, StoredListing
from db.records import ListingImageRecord, ListingOutcome, ListingRecord, ResultRecord
from worker.analysis import LookupCached, image_records, model_wait
from worker.fetch import FetchPolicy, Validators
from worker.image_fetch import FailedImage, Fetched, ImageRequest, fetch_each
from worker.images import PreparedImage, prepare_images
from worker.inference import EmbedRequest, InferenceService, Ticket
from worker.quality import ImageQuality
from worker.scorer import ListingScorer, Scored, Similarity, UsableImages, failed_result
from worker.tensor_input import EncodedJpeg

_TOLERANCE = 1e-6  # a float that moved less than this has not changed


@dataclass
class ChunkAnalysis:
    """What a chunk found: the rows to write, how its listings ended, what to try again."""

    outcomes: list[ListingOutcome] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    unchanged: int = 0
    transient: dict[str, str] = field(default_factory=dict)  # listing_id -> why
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: fetch, decode, infer
    # Per listing that reached the model: the units (images, or 1) of the batch that served it.
    batch_units: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Images:
    """One listing's images, resolved: usable ones (each with its vector) and failed ones."""

    usable: list[PreparedImage]
    failed: list[FailedImage]
    fetched: bool  # fetched now (its image list is rewritten), or taken from what is stored
    new: dict[str, np.ndarray] = field(default_factory=dict)  # embedded now, by SHA-256


@dataclass
class ChunkAnalyzer:
    """Held warm by the worker, beside the single-listing analyzer, sharing its model."""

    service: InferenceService
    scorer: ListingScorer
    policy: FetchPolicy
    max_pixels: int
    executor: Executor
    lookup_cached: LookupCached
    model_id: str
    model_timeout: float
    group_size: int  # listings fetched, decoded and embedded together (bounds pixel memory)

    def analyze(
        self,
        stored: dict[str, StoredListing],
        *,
        refetch: bool,
        recompute: bool,
        deadline: float | None = None,
    ) -> ChunkAnalysis:
        """Analyse every listing in `stored`; a listing's transient failure is reported, not
        raised. `deadline` (monotonic seconds): no fetch starts after it (those listings are
        reported transient) and a model wait past it raises `TransientError`. The thresholds
        are read first: a rescoring run applies those recorded before it."""
        self.scorer.thresholds.refresh()
        return self._analyze(stored, refetch=refetch, recompute=recompute, deadline=deadline)

    def analyze_new(
        self, listings: Sequence[ListingRecord], deadline: float, ticket: Ticket | None = None
    ) -> ChunkAnalysis:
        """Analyse listings as jobs do (a group of jobs, `worker.job_groups`): everything
        fetched, every row written, images and texts in one request to the model. The
        thresholds in force are the scorer's own (workers re-read them every few seconds).
        `deadline` (monotonic seconds): the attempts' end; no fetch or model wait runs past
        it. `ticket`: the group announced its request to the batcher already."""
        stored = {listing.listing_id: StoredListing(listing, [], None) for listing in listings}
        texts = {r.listing_id: r.text for r in listings} if self.scorer.scores_text else {}
        return self._analyze(
            stored, refetch=False, recompute=True, deadline=deadline, texts=texts, ticket=ticket
        )

    def _analyze(
        self,
        stored: dict[str, StoredListing],
        *,
        refetch: bool,
        recompute: bool,
        deadline: float | None = None,
        texts: dict[str, str] | None = None,
        ticket: Ticket | None = None,
    ) -> ChunkAnalysis:
        """`texts` (by listing): embedded with the first images, each with its listing's
        request (`ticket`: announced)."""
        found = ChunkAnalysis()
        cached = {
            image.sha256: image.cached
            for state in stored.values()
            for image in state.images
            if image.sha256 is not None and image.cached is not None
        }
        resolved: dict[str, _Images] = {}
        to_fetch: list[StoredListing] = []
        for listing_id, state in stored.items():
            images = None if refetch else _from_store(state)
            if images is None:
                to_fetch.append(state)
            else:
                resolved[listing_id] = images
        text_rows: dict[str, torch.Tensor] = {}
        for start in range(0, len(to_fetch), self.group_size):
            states = to_fetch[start : start + self.group_size]
            group = self._fetch(states, cached, refetch, found, deadline)
            began = time.monotonic()
            embedded, rows = self._embed_images(group, found, deadline, texts, ticket)
            _add(found.seconds, "infer", time.monotonic() - began)
            resolved |= embedded
            text_rows |= rows
            texts, ticket = None, None
        wanted = self._texts_to_embed(stored, resolved, recompute)
        text_rows |= self._embed_texts([t for t in wanted if t not in text_rows], deadline)
        self._score_all(stored, resolved, text_rows, recompute, found)
        return found

    def _fetch(
        self,
        states: list[StoredListing],
        cached: dict[str, CachedImage],
        refetch: bool,
        found: ChunkAnalysis,
        deadline: float | None = None,
    ) -> dict[str, _Images]:
        """Fetch (conditionally, with `refetch`) and prepare every image of these listings."""
        if not states:
            return {}
        owners: list[str] = []
        requests: list[ImageRequest] = []
        for state in states:
            for request in _image_requests(state, cached if refetch else {}):
                owners.append(state.listing.listing_id)
                requests.append(request)
        began = time.monotonic()
        results = fetch_each(
            requests, self.policy, self.executor, deadline, self.service.pool_fetch
        )
        by_listing: dict[str, list[Fetched]] = {s.listing.listing_id: [] for s in states}
        for owner, result in zip(owners, results, strict=True):
            if isinstance(result, Exception):
                found.transient.setdefault(owner, str(result))
            else:
                by_listing[owner].append(result)
        fetched = [
            f for owner, items in by_listing.items() if owner not in found.transient for f in items
        ]
        more = self.lookup_cached([f.sha256 for f in fetched if not isinstance(f, FailedImage)])
        fetched_at = time.monotonic()
        _add(found.seconds, "fetch", fetched_at - began)
        info = self.service.backend.info
        prepared = prepare_images(
            fetched,
            cached | more,
            preprocess=self.service.preprocess,
            max_pixels=self.max_pixels,
            draft_size=max(info.image_size, 256),
            executor=self.executor,
            encode=self.service.encoded,
            decode=self.service.pool_decode,
        )
        _add(found.seconds, "decode", time.monotonic() - fetched_at)
        out: dict[str, _Images] = {}
        index = 0
        for owner, items in by_listing.items():
            if owner in found.transient:
                continue
            mine = prepared[index : index + len(items)]
            index += len(items)
            usable = [p for p in mine if isinstance(p, PreparedImage)]
            failed = [p for p in mine if isinstance(p, FailedImage)]
            out[owner] = _Images(usable, failed, fetched=True)
        return out

    def _texts_to_embed(
        self,
        stored: dict[str, StoredListing],
        resolved: dict[str, _Images],
        recompute: bool,
    ) -> list[str]:
        """The distinct texts whose similarity cannot be reused."""
        if not self.scorer.scores_text:
            return []
        texts: dict[str, None] = {}
        for listing_id, images in resolved.items():
            if not images.usable:
                continue
            state = stored[listing_id]
            if recompute or self._reusable(state, images) is None:
                texts[state.listing.text] = None
        return list(texts)

    def _reusable(self, state: StoredListing, images: _Images) -> Similarity | None:
        return self.scorer.reused_similarity(state.listing, _placeholder(images), state.result)

    def _model_wait(self, deadline: float | None) -> float:
        return model_wait(deadline, self.model_timeout)

    def _embed_images(
        self,
        group: dict[str, _Images],
        found: ChunkAnalysis,
        deadline: float | None = None,
        texts: dict[str, str] | None = None,
        ticket: Ticket | None = None,
    ) -> tuple[dict[str, _Images], dict[str, torch.Tensor]]:
        """One request per listing for the group's new images (deduplicated) and `texts` (by
        listing), all submitted at once: batched together, yet a request the model refuses
        fails only its listing (and those sharing its images), reported in `found.transient`.
        Pixels are let go as soon as they are embedded. JPEGs left encoded (`LV_DECODE`) are
        decoded and measured in the batch: each gets its blur and brightness, or fails alone."""
        texts = texts or {}
        owners: list[str] = []
        requests: list[EmbedRequest] = []
        taken: set[str] = set()
        for listing_id in dict.fromkeys([*group, *texts]):
            fresh: dict[str, torch.Tensor | EncodedJpeg] = {}
            for image in group[listing_id].usable if listing_id in group else []:
                sha = image.facts.sha256
                if image.pixels is not None and sha not in taken:
                    fresh[sha] = image.pixels
                    taken.add(sha)
            text = texts.get(listing_id)
            text_part = (text,) if text is not None and text not in taken else ()
            if text is not None:
                taken.add(text)
            if fresh or text_part:
                owners.append(listing_id)
                requests.append(EmbedRequest(tuple(fresh.values()), text_part, tuple(fresh)))
        if not requests:
            if ticket is not None:
                ticket.withdraw()
            return group, {}
        answers = self.service.embed_many(requests, self._model_wait(deadline), ticket)
        outcome: dict[str, _Embedded] = {}
        text_rows: dict[str, torch.Tensor] = {}
        lost: dict[str, str] = {}  # image SHA-256 or text -> why its request failed
        for owner, request, answer in zip(owners, requests, answers, strict=True):
            if isinstance(answer, Exception):
                why = one_line(answer)
                lost.update(dict.fromkeys([*request.keys, *request.texts], why))
                found.transient.setdefault(owner, why)
                continue
            found.batch_units[owner] = answer.batch_units
            text_rows.update(zip(request.texts, answer.text_embeddings, strict=True))
            errors = answer.errors or (None,) * len(request.keys)
            qualities = answer.qualities or (None,) * len(request.keys)
            # One array, its rows views: iterating the tensor made a tensor per row, then an
            # array of each (a tenth of a group thread's time in a profile).
            for sha, row, quality, error in zip(
                request.keys, answer.image_embeddings.numpy(), qualities, errors, strict=True
            ):
                outcome[sha] = _Embedded(row if error is None else None, quality, error)
        embedded_group: dict[str, _Images] = {}
        for listing_id, images in group.items():
            needs = [i.facts.sha256 for i in images.usable if i.pixels is not None]
            needs += [texts[listing_id]] if listing_id in texts else []
            failure = next((lost[key] for key in needs if key in lost), None)
            if failure is not None:  # its own request failed, or the one holding a shared image
                found.transient.setdefault(listing_id, failure)
                continue
            embedded_group[listing_id] = _embedded(images, outcome)
        return embedded_group, text_rows

    def _embed_texts(
        self, texts: list[str], deadline: float | None = None
    ) -> dict[str, torch.Tensor]:
        """One request to the batcher for the chunk's texts (deduplicated)."""
        if not texts:
            return {}
        request = EmbedRequest(texts=tuple(texts))
        embedded = self.service.embed(request, self._model_wait(deadline))
        return dict(zip(texts, embedded.text_embeddings, strict=True))

    def _score_all(
        self,
        stored: dict[str, StoredListing],
        resolved: dict[str, _Images],
        text_rows: dict[str, torch.Tensor],
        recompute: bool,
        found: ChunkAnalysis,
    ) -> None:
        """Every listing's row, the categories of all of them ranked in one matrix product."""
        scored: list[tuple[StoredListing, _Images, Scored]] = []
        for listing_id, images in resolved.items():
            state = stored[listing_id]
            if not images.usable:
                total = len(images.failed)
                result = failed_result(sorted(images.failed, key=lambda f: f.position), total)
                self._settle(state, images, result, {}, found)
                continue
            usable = UsableImages(
                [p.position for p in images.usable],
                [p.facts.sha256 for p in images.usable],
                torch.from_numpy(np.stack([_vector(p) for p in images.usable])),
            )
            similarity = None
            if self.scorer.scores_text and not recompute:
                similarity = self.scorer.reused_similarity(state.listing, usable, state.result)
            if self.scorer.scores_text and similarity is None:
                similarity = self.scorer.similarity(usable, text_rows[state.listing.text])
            scored.append((state, images, Scored(state.listing, usable, images.failed, similarity)))
        results = self.scorer.results([item for _, _, item in scored])
        for (state, images, _), result in zip(scored, results, strict=True):
            new = {sha: vector.tolist() for sha, vector in images.new.items()}
            self._settle(state, images, result, new, found)

    def _settle(
        self,
        state: StoredListing,
        images: _Images,
        result: ResultRecord,
        new_embeddings: dict[str, list[float]],
        found: ChunkAnalysis,
    ) -> None:
        """Count the listing's outcome; keep its rows to write unless nothing changed."""
        if result.status == "ok":
            found.ok += 1
        else:
            found.failed += 1
        records = image_records([*images.usable, *images.failed]) if images.fetched else []
        images_same = not records or _same_images(records, state.images)
        if images_same and same_result(result, state.result):
            found.unchanged += 1
            return
        found.outcomes.append(
            ListingOutcome(
                listing_id=state.listing.listing_id,
                model_id=self.model_id,
                result=result,
                listing_updated_at=state.listing.updated_at,
                images=[] if images_same else records,
                new_embeddings=new_embeddings,
            )
        )


def _add(seconds: dict[str, float], stage: str, spent: float) -> None:
    seconds[stage] = seconds.get(stage, 0.0) + spent


def _from_store(state: StoredListing) -> _Images | None:
    """The listing's images as stored, if that is its current list and every usable image is
    embedded by this model (None: it must be fetched)."""
    if not state.images_current():
        return None
    usable: list[PreparedImage] = []
    failed: list[FailedImage] = []
    for image in state.images:
        if image.sha256 is None:
            failed.append(FailedImage(image.position, image.url, image.error or "not fetched"))
            continue
        known = image.cached
        if known is None:
            return None
        usable.append(PreparedImage(image.position, image.url, known.facts, None, known.embedding))
    return _Images(usable, failed, fetched=False) if usable else None


def _image_requests(state: StoredListing, cached: dict[str, CachedImage]) -> list[ImageRequest]:
    """The listing's current URLs; where the stored list matches and its content is embedded,
    with the validators of the last fetch (a conditional request)."""
    stored = {i.position: i for i in state.images} if state.images_current() else {}
    requests = []
    for position, url in enumerate(state.listing.image_urls):
        image = stored.get(position)
        if image is not None and image.sha256 is not None and image.sha256 in cached:
            validators = Validators(image.etag, image.last_modified)
            requests.append(ImageRequest(position, url, image.sha256, validators))
        else:
            requests.append(ImageRequest(position, url))
    return requests


def _vector(image: PreparedImage) -> np.ndarray:
    if image.cached_embedding is None:  # stored, or set by `_embed_images`
        raise RuntimeError(f"image {image.facts.sha256} has no embedding")
    return image.cached_embedding


@dataclass(frozen=True)
class _Embedded:
    """What the batch made of one new image: its vector, and for a JPEG it decoded its
    measures, or why it could not decode it."""

    vector: np.ndarray | None
    quality: ImageQuality | None
    error: str | None


def _embedded(images: _Images, outcome: dict[str, _Embedded]) -> _Images:
    """The listing's images with their new vectors in place of their pixels (an image the
    batch could not decode becomes a failed one)."""
    usable, failed, new = [], list(images.failed), {}
    for image in images.usable:
        done = outcome.get(image.facts.sha256) if image.pixels is not None else None
        if done is None:
            usable.append(image)
            continue
        if done.error is not None or done.vector is None:
            failed.append(FailedImage(image.position, image.url, done.error or "not embedded"))
            continue
        facts = image.facts
        if done.quality is not None:
            facts = replace(facts, blur=done.quality.blur, brightness=done.quality.brightness)
        usable.append(replace(image, facts=facts, pixels=None, cached_embedding=done.vector))
        new[image.facts.sha256] = done.vector
    return _Images(usable, sorted(failed, key=lambda f: f.position), images.fetched, new)


def _placeholder(images: _Images) -> UsableImages:
    """Positions and contents only: enough to tell whether a stored similarity still holds."""
    return UsableImages(
        [p.position for p in images.usable],
        [p.facts.sha256 for p in images.usable],
        torch.empty(0),
    )


def _same_images(records: list[ListingImageRecord], stored: list[StoredImage]) -> bool:
    """True when a fetch found the image list as stored (content, errors and validators)."""
    if len(records) != len(stored):
        return False
    return all(
        (r.position, r.url, r.facts.sha256 if r.facts else None, r.error, r.etag, r.last_modified)
        == (s.position, s.url, s.sha256, s.error, s.etag, s.last_modified)
        for r, s in zip(records, stored, strict=True)
    )


def same_result(new: ResultRecord, old: ResultRecord | None) -> bool:
    """True when writing `new` over `old` would change nothing a poller can see."""
    if old is None:
        return False
    exact = (
        "status",
        "error",
        "is_match",
        "top_category",
        "category_mismatch",
        "best_image",
        "images_total",
        "images_failed",
        "text_sha256",
        "image_shas",
    )
    if any(getattr(new, name) != getattr(old, name) for name in exact):
        return False
    return _close(new.similarity, old.similarity) and _same_categories(
        new.categories, old.categories
    )


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, abs_tol=_TOLERANCE)


def _same_categories(
    a: Sequence[dict[str, object]] | None, b: Sequence[dict[str, object]] | None
) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x["label"] == y["label"] and _close(float(x["score"]), float(y["score"]))  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True)
    )
