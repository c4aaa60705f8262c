"""The compare report's rows from hand-made scores: ranking, agreement, flips, reindex time."""

from __future__ import annotations

import pytest

from contract.thresholds import Thresholds
from listing_vision.toolkit.evaluate import Evaluation, Measured, ScoredListing
from listing_vision.toolkit.labelled import LabelledListing
from listing_vision.toolkit.report import Candidate, as_json, build_reports
from producer.events import ListingEvent

MISMATCH = [True, False, True, False]
IDS = ["a", "b", "c", "d"]


def _labelled() -> list[LabelledListing]:
    return [
        LabelledListing(
            ListingEvent(listing_id=i, title="t", image_urls=("https://x.test/i.jpg",)),
            m,
            "mug" if i in "ab" else None,
        )
        for i, m in zip(IDS, MISMATCH, strict=True)
    ]


def _candidate(
    model_id: str, scores: list[float | None], threshold: float, images_per_s: float = 10.0
) -> Candidate:
    listings = [
        ScoredListing(i, "ok" if s is not None else "failed", None, s, ("mug", "hat", "lamp"))
        for i, s in zip(IDS, scores, strict=True)
    ]
    run = Evaluation(model_id, True, "cosine", 8, "cpu", listings, 40, 40 / images_per_s, 0.1)
    return Candidate(model_id, Thresholds(threshold), False, Measured(run, 2**30, "rss", 2**29))


def test_rows_rank_by_auc_and_measure_against_the_active_model() -> None:
    good = _candidate("good", [0.1, 0.9, 0.2, 0.8], 0.5)  # separates perfectly
    bad = _candidate("bad", [0.9, 0.1, 0.8, 0.2], 0.5, images_per_s=20.0)  # inverted
    broken = Candidate("broken", Thresholds(0.5), False, None, "weights not found")
    reports = build_reports([bad, broken, good], _labelled(), "good", catalogue_images=100)
    assert [r.model_id for r in reports] == ["good", "bad", "broken"]
    first, second, third = reports
    assert first.active and first.roc_auc == 1.0 and first.spearman_vs_active == 1.0
    assert first.flipped_vs_active == 0.0
    assert first.at_threshold is not None and first.at_threshold.f1 == 1.0
    assert second.roc_auc == 0.0
    assert second.spearman_vs_active == pytest.approx(-1.0)
    assert second.flipped_vs_active == 1.0  # every verdict the other way
    assert second.reindex_seconds == pytest.approx(100 / 20.0)
    assert first.top1 == 1.0 and first.top3 == 1.0  # a and b labelled "mug", ranked first
    assert third.error == "weights not found" and third.roc_auc is None
    assert as_json(third, 3)["rank"] == 3 and as_json(first, 1)["best"]["f1"] == 1.0


def test_listings_a_model_failed_are_left_out_of_its_metrics() -> None:
    partial = _candidate("partial", [0.1, None, 0.2, 0.8], 0.5)
    (report,) = build_reports([partial], _labelled(), "other", catalogue_images=0)
    assert (report.scored, report.failed) == (3, 1)
    assert report.roc_auc == 1.0
    assert report.spearman_vs_active is None and report.flipped_vs_active is None
