"""The detection metrics against values worked out by hand (mismatch is the positive class)."""

from __future__ import annotations

import math

import pytest

from listing_vision.toolkit.metrics import (
    average_ranks,
    best_threshold,
    candidate_detections,
    detection,
    detection_at,
    flip_share,
    roc_auc,
    spearman,
    top_k_accuracy,
)

# Sorted: 0.1 mismatch, 0.2 match, 0.2 mismatch, 0.4 match.
SCORES = [0.1, 0.2, 0.2, 0.4]
MISMATCH = [True, True, False, False]


def test_detection_counts_precision_recall_and_f1() -> None:
    found = detection([True, True, False, False], [True, False, True, False])
    assert (found.true_positives, found.false_positives, found.false_negatives) == (1, 1, 1)
    assert (found.precision, found.recall, found.f1) == (0.5, 0.5, 0.5)


def test_nothing_flagged_is_precision_zero_and_f1_zero() -> None:
    found = detection([False, False], [True, False])
    assert (found.flagged, found.precision, found.recall, found.f1) == (0, 0.0, 0.0, 0.0)


def test_a_listing_is_flagged_below_the_threshold_not_at_it() -> None:
    found = detection_at(SCORES, MISMATCH, 0.2)
    assert (found.true_positives, found.false_positives) == (1, 0)


def test_candidate_thresholds_sit_between_neighbouring_scores_and_skip_ties() -> None:
    found = candidate_detections(SCORES, MISMATCH)
    thresholds = [d.threshold for d in found]
    assert thresholds[:2] == pytest.approx([0.15, 0.3])
    assert thresholds[2] == pytest.approx(0.4, abs=1e-5) and thresholds[2] > 0.4
    counts = [(d.true_positives, d.false_positives, d.false_negatives) for d in found]
    assert counts == [(1, 0, 1), (2, 1, 0), (2, 2, 0)]


def test_best_threshold_maximises_f1() -> None:
    # F1: 2/3 at 0.15, 0.8 at 0.3, 2/3 above 0.4.
    best = best_threshold(SCORES, MISMATCH)
    assert best is not None
    assert best.threshold == pytest.approx(0.3)
    assert best.f1 == pytest.approx(0.8)


def test_min_precision_takes_the_most_recall_that_reaches_it() -> None:
    strict = best_threshold(SCORES, MISMATCH, min_precision=0.9)
    assert strict is not None and strict.threshold == pytest.approx(0.15)
    assert (strict.precision, strict.recall) == (1.0, 0.5)
    loose = best_threshold(SCORES, MISMATCH, min_precision=0.6)
    assert loose is not None and loose.threshold == pytest.approx(0.3)


def test_f1_ties_go_to_the_lowest_threshold() -> None:
    # 0.15 (P 1, R 1/2) and above 0.4 (P 1/2, R 1) both have F1 2/3 on this set.
    best = best_threshold([0.1, 0.2, 0.3, 0.4], [True, False, False, True])
    assert best is not None and best.threshold == pytest.approx(0.15)


def test_no_threshold_without_a_reachable_precision_or_any_mismatch() -> None:
    assert best_threshold([0.1, 0.2], [False, True], min_precision=1.0) is None
    assert best_threshold([0.1, 0.5], [False, True], min_precision=0.9) is None
    assert best_threshold([0.1, 0.2], [False, False]) is None
    assert best_threshold([], []) is None


def test_average_ranks_share_ties() -> None:
    assert average_ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]


def test_roc_auc_counts_ties_half() -> None:
    # Matches {0.2, 0.4} against mismatches {0.1, 0.2}: 1 + 0.5 + 1 + 1 of 4 pairs.
    assert roc_auc(SCORES, MISMATCH) == pytest.approx(0.875)
    assert roc_auc([0.9, 0.1], [False, True]) == 1.0
    assert roc_auc([0.1, 0.9], [False, True]) == 0.0
    assert roc_auc([0.1, 0.9], [False, False]) is None


def test_spearman_from_squared_rank_differences() -> None:
    # d = (0, 1, 1, 0): 1 - 6 * 2 / (4 * 15) = 0.8.
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_with_ties_is_pearson_on_average_ranks() -> None:
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))


def test_spearman_undefined_for_a_constant_side_or_one_pair() -> None:
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1], [2]) is None


def test_top_k_accuracy_over_listings_with_a_true_category() -> None:
    ranked = [("mug", "hat", "lamp"), ("hat", "lamp", "mug"), ("lamp", "mug", "hat")]
    truth = ["mug", "mug", None]
    assert top_k_accuracy(ranked, truth, 1) == 0.5
    assert top_k_accuracy(ranked, truth, 3) == 1.0
    assert top_k_accuracy(ranked, [None, None, None], 1) is None


def test_flip_share_among_listings_both_judged() -> None:
    assert flip_share([True, False, None, True], [True, True, False, None]) == 0.5
    assert flip_share([None], [True]) is None
