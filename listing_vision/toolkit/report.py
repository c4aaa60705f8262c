"""The model-upgrade report of `compare`: one row of metrics per candidate, from its scores on
the labelled listings, pure (the command runs the models and prints the rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from contract.thresholds import Thresholds
from listing_vision.toolkit.evaluate import Measured, ScoredListing
from listing_vision.toolkit.labelled import LabelledListing
from listing_vision.toolkit.metrics import (
    Detection,
    best_threshold,
    candidate_detections,
    detection,
    flip_share,
    roc_auc,
    spearman,
    top_k_accuracy,
)


@dataclass(frozen=True)
class Candidate:
    """A model as compared: its run (None if it could not run: `error`) and its thresholds in
    force (recorded by `calibrate`, else the registry's)."""

    model_id: str
    thresholds: Thresholds
    calibrated: bool
    measured: Measured | None
    error: str | None = None


@dataclass(frozen=True)
class ModelReport:
    """One row of the report. Detection metrics treat a mismatch as the positive class."""

    model_id: str
    active: bool
    error: str | None = None
    scoring: str | None = None  # "cosine", or "sigmoid" (SigLIP-style: its own scale)
    embed_dim: int | None = None
    device: str | None = None
    scored: int = 0
    failed: int = 0
    threshold: float | None = None  # model-wide threshold in force
    threshold_source: str | None = None  # "calibrated" or "registry"
    at_threshold: Detection | None = None
    best: Detection | None = None
    roc_auc: float | None = None
    top1: float | None = None
    top3: float | None = None
    spearman_vs_active: float | None = None
    flipped_vs_active: float | None = None
    images_per_s: float | None = None
    load_seconds: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None  # "gpu" (torch's peak allocation) or "rss" (the process's)
    baseline_memory_bytes: int | None = None  # rss before the model was loaded
    reindex_seconds: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (recall, precision)

    def sort_key(self) -> tuple[float, ...]:
        """Best first: models that ran, by ROC AUC (threshold-free), then best F1, then speed."""
        return (
            self.error is None,
            self.roc_auc if self.roc_auc is not None else -1.0,
            self.best.f1 if self.best else -1.0,
            self.images_per_s or 0.0,
        )


def build_reports(
    candidates: Sequence[Candidate],
    labelled: Sequence[LabelledListing],
    active_id: str,
    catalogue_images: int,
) -> list[ModelReport]:
    """A row per candidate, best first; agreement is measured against `active_id`'s run."""
    by_id = {c.model_id: c for c in candidates}
    active = by_id.get(active_id)
    reports = [
        _report(candidate, labelled, active, candidate.model_id == active_id, catalogue_images)
        for candidate in candidates
    ]
    return sorted(reports, key=ModelReport.sort_key, reverse=True)


def _report(
    candidate: Candidate,
    labelled: Sequence[LabelledListing],
    active: Candidate | None,
    is_active: bool,
    catalogue_images: int,
) -> ModelReport:
    if candidate.measured is None:
        return ModelReport(candidate.model_id, is_active, error=candidate.error or "did not run")
    run = candidate.measured.evaluation
    scored = [(item, s) for item, s in zip(labelled, run.listings, strict=True) if s.status == "ok"]
    rate = run.images_per_s
    row = ModelReport(
        candidate.model_id,
        is_active,
        scoring=run.scoring if run.has_text else None,
        embed_dim=run.embed_dim,
        device=run.device,
        scored=len(scored),
        failed=len(run.listings) - len(scored),
        images_per_s=rate,
        load_seconds=run.load_seconds,
        peak_memory_bytes=candidate.measured.peak_memory_bytes,
        memory_kind=candidate.measured.memory_kind,
        baseline_memory_bytes=candidate.measured.baseline_memory_bytes,
        reindex_seconds=catalogue_images / rate if rate else None,
    )
    if not run.has_text:
        return row  # image-only (DINOv2): no similarity, no categories
    return _with_text_metrics(row, candidate, scored, active)


def _with_text_metrics(
    row: ModelReport,
    candidate: Candidate,
    scored: list[tuple[LabelledListing, ScoredListing]],
    active: Candidate | None,
) -> ModelReport:
    judged = [(item, s.similarity) for item, s in scored if s.similarity is not None]
    scores = [similarity for _, similarity in judged]
    labels = [item.mismatch for item, _ in judged]
    verdicts = [candidate.thresholds.is_match(sim, item.claimed) for item, sim in judged]
    at_threshold = (
        None
        if any(v is None for v in verdicts)
        else detection([not v for v in verdicts], labels, candidate.thresholds.default)
    )
    spearman_active, flipped = _agreement(candidate, active, judged)
    return replace(
        row,
        threshold=candidate.thresholds.default,
        threshold_source="calibrated" if candidate.calibrated else "registry",
        at_threshold=at_threshold,
        best=best_threshold(scores, labels),
        roc_auc=roc_auc(scores, labels),
        top1=_top_k(scored, 1),
        top3=_top_k(scored, 3),
        spearman_vs_active=spearman_active,
        flipped_vs_active=flipped,
        curve=[(d.recall, d.precision) for d in candidate_detections(scores, labels)],
    )


def _top_k(scored: list[tuple[LabelledListing, ScoredListing]], k: int) -> float | None:
    return top_k_accuracy(
        [s.categories for _, s in scored], [i.true_category for i, _ in scored], k
    )


def _agreement(
    candidate: Candidate,
    active: Candidate | None,
    judged: list[tuple[LabelledListing, float]],
) -> tuple[float | None, float | None]:
    """Spearman's rho of the two models' similarities, and the share of verdicts that flip
    (each model judged by its own thresholds), on listings both scored."""
    if active is None or active.measured is None or not active.measured.evaluation.has_text:
        return None, None
    theirs = {
        s.listing_id: s.similarity
        for s in active.measured.evaluation.listings
        if s.similarity is not None
    }
    pairs = [
        (item, mine, theirs[item.event.listing_id])
        for item, mine in judged
        if item.event.listing_id in theirs
    ]
    rho = spearman([mine for _, mine, _ in pairs], [other for _, _, other in pairs])
    flips = flip_share(
        [candidate.thresholds.is_match(mine, item.claimed) for item, mine, _ in pairs],
        [active.thresholds.is_match(other, item.claimed) for item, _, other in pairs],
    )
    return rho, flips


def as_json(report: ModelReport, rank: int) -> dict[str, Any]:
    """A row as plain JSON (detections spelled out, the curve left to the plot)."""
    data = {k: v for k, v in report.__dict__.items() if k not in ("curve",)}
    data["rank"] = rank
    for key in ("at_threshold", "best"):
        found: Detection | None = data[key]
        data[key] = None if found is None else _detection_json(found)
    return data


def _detection_json(found: Detection) -> dict[str, Any]:
    return {
        "threshold": found.threshold,
        "precision": found.precision,
        "recall": found.recall,
        "f1": found.f1,
        "flagged": found.flagged,
        "true_positives": found.true_positives,
        "false_positives": found.false_positives,
        "false_negatives": found.false_negatives,
    }
