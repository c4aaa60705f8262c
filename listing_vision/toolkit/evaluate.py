"""A model run over labelled listings in this process, through the worker's own analysis code.

The listings go through `worker.analysis.ListingAnalyzer` exactly as single jobs do in a
worker (the fetch guard, the decoder and its limits, the backend's preprocessing, the dynamic
batcher, the scoring and the category index), many at once so the batcher forms real batches,
but nothing is written: labelled listings are not part of the catalogue, and stay out of its
results, its nightly rescoring and its embeddings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from contract.errors import one_line
from contract.registry import ModelSpec
from contract.settings import Settings
from contract.thresholds import Thresholds
from db.records import ListingRecord
from worker.analysis import ListingAnalyzer
from worker.backends import create_backend
from worker.inference import InferenceService
from worker.runtime import batch_limits, fetch_policy, make_scorer, worker_concurrency

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredListing:
    """What the model found for one listing: its similarity and top categories (best first),
    or why it could not be scored."""

    listing_id: str
    status: str  # "ok" or "failed"
    error: str | None
    similarity: float | None
    categories: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    """One model over a set of listings, with the facts `compare` reports."""

    model_id: str
    has_text: bool
    scoring: str  # "cosine" or "sigmoid"
    embed_dim: int
    device: str
    listings: list[ScoredListing]  # in the order given
    images: int  # images the model embedded
    seconds: float  # wall time of the analyses (the model already loaded)
    load_seconds: float

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds > 0 else None


def evaluate(settings: Settings, spec: ModelSpec, listings: Sequence[ListingRecord]) -> Evaluation:
    """Load `spec`'s model and analyse every listing with it; a listing that cannot be analysed
    is `failed` with its error, never an exception."""
    backend = create_backend(spec)
    started = time.perf_counter()
    info = backend.load()
    load_seconds = time.perf_counter() - started
    max_size, max_wait = batch_limits(settings, spec)
    service = InferenceService(
        backend, max_size=max_size, max_wait_s=max_wait, input_path=settings.input_path
    )
    try:
        # Verdicts are the caller's (it knows which thresholds it compares); none here.
        scorer = make_scorer(settings, spec, service, Thresholds(None))
        threads = max(1, min(len(listings), worker_concurrency(settings, spec)))
        with (
            ThreadPoolExecutor(min(64, 2 * threads), thread_name_prefix="fetch") as fetches,
            ThreadPoolExecutor(threads, thread_name_prefix="listing") as jobs,
        ):
            analyzer = ListingAnalyzer(
                service,
                scorer,
                fetch_policy(settings),
                settings.max_image_pixels,
                fetches,
                lambda _shas: {},  # nothing stored is reused: every image is embedded
                float(settings.task_time_limit),
            )
            started = time.perf_counter()
            scored = list(jobs.map(lambda listing: _analyse(analyzer, listing), listings))
            seconds = time.perf_counter() - started
    finally:
        service.close()
    return Evaluation(
        model_id=spec.model_id,
        has_text=scorer.scores_text,
        scoring=info.scoring,
        embed_dim=info.embed_dim,
        device=backend.device.type,
        listings=scored,
        images=service.calls.images,
        seconds=seconds,
        load_seconds=load_seconds,
    )


def _analyse(analyzer: ListingAnalyzer, listing: ListingRecord) -> ScoredListing:
    try:
        result = analyzer.analyze(listing).result
    except Exception as error:  # a model timeout, or a bug: this listing's failure only
        log.warning("%s not analysed: %s", listing.listing_id, one_line(error))
        return ScoredListing(listing.listing_id, "failed", one_line(error), None, ())
    labels = tuple(str(c["label"]) for c in result.categories or ())
    return ScoredListing(listing.listing_id, result.status, result.error, result.similarity, labels)


@dataclass(frozen=True)
class Measured:
    """An evaluation and the peak memory of the process that ran it: GPU memory allocated by
    torch on a GPU; on the CPU the process's peak resident set, and its resident set before the
    model was loaded (Python, torch and the libraries: the difference is the model's)."""

    evaluation: Evaluation
    peak_memory_bytes: int
    memory_kind: str  # "gpu" or "rss"
    baseline_memory_bytes: int | None = None  # rss only


def measured_evaluation(
    settings: Settings, spec: ModelSpec, listings: Sequence[ListingRecord]
) -> Measured:
    """`evaluate`, then the peak memory: meant for a fresh process per model (`compare`), where
    the peak is this model's alone."""
    import resource

    import psutil
    import torch

    baseline = int(psutil.Process().memory_info().rss)
    evaluation = evaluate(settings, spec, listings)
    if evaluation.device == "cuda":
        return Measured(evaluation, int(torch.cuda.max_memory_allocated()), "gpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return Measured(evaluation, peak, "rss", baseline)
