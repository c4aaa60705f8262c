"""Detection metrics, pure and small enough to check by hand (no scikit-learn here).

Mismatch detection is what a threshold is for: a listing is *flagged* when its similarity is
below the threshold (`is_match` false), and a flagged listing labelled `mismatch` is a true
positive. Precision: the share of flagged listings that are real mismatches (false alarms cost
sellers); recall: the share of real mismatches flagged. Nothing flagged counts as precision 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Detection:
    """Counts of mismatch detection at one threshold (None: per-listing thresholds)."""

    threshold: float | None
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def flagged(self) -> int:
        return self.true_positives + self.false_positives

    @property
    def precision(self) -> float:
        return self.true_positives / self.flagged if self.flagged else 0.0

    @property
    def recall(self) -> float:
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def detection(
    flagged: Sequence[bool], mismatch: Sequence[bool], threshold: float | None = None
) -> Detection:
    """Counts from per-listing verdicts (`flagged`: is_match false) and labels."""
    pairs = list(zip(flagged, mismatch, strict=True))
    return Detection(
        threshold,
        sum(f and m for f, m in pairs),
        sum(f and not m for f, m in pairs),
        sum(m and not f for f, m in pairs),
    )


def detection_at(scores: Sequence[float], mismatch: Sequence[bool], threshold: float) -> Detection:
    """Mismatch detection with one threshold for every listing."""
    return detection([s < threshold for s in scores], mismatch, threshold)


def candidate_detections(scores: Sequence[float], mismatch: Sequence[bool]) -> list[Detection]:
    """Every distinct way one threshold can split the listings (flagging at least one), lowest
    threshold first. Thresholds sit midway between neighbouring scores (the last just above the
    highest), so a score that moves by rounding keeps its verdict."""
    if len(scores) != len(mismatch):
        raise ValueError("scores and labels differ in length")
    if not scores:
        return []
    pairs = sorted(zip(scores, mismatch, strict=True))
    total_mismatches = sum(mismatch)
    found: list[Detection] = []
    tp = fp = 0
    for index, (score, is_mismatch) in enumerate(pairs):
        tp += is_mismatch
        fp += not is_mismatch
        following = pairs[index + 1][0] if index + 1 < len(pairs) else None
        if following == score:
            continue  # a threshold cannot split equal scores
        threshold = (
            (score + following) / 2
            if following is not None
            else score + max(1e-6, abs(score) * 1e-6)
        )
        found.append(Detection(threshold, tp, fp, total_mismatches - tp))
    return found


def best_threshold(
    scores: Sequence[float], mismatch: Sequence[bool], min_precision: float | None = None
) -> Detection | None:
    """The threshold with the highest F1 or, with `min_precision`, the highest recall among those
    reaching that precision (then the highest F1). Ties go to the lowest threshold (fewer
    listings flagged). None when no threshold catches a mismatch (or reaches the precision)."""
    candidates = [d for d in candidate_detections(scores, mismatch) if d.true_positives]
    if min_precision is not None:
        candidates = [d for d in candidates if d.precision >= min_precision - 1e-12]
    if not candidates:
        return None
    # max() keeps the first of equals: the lowest threshold.
    if min_precision is None:
        return max(candidates, key=lambda d: d.f1)
    return max(candidates, key=lambda d: (d.recall, d.f1))


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        start = end + 1
    return ranks


def roc_auc(scores: Sequence[float], mismatch: Sequence[bool]) -> float | None:
    """The chance that a random matching listing scores above a random mismatch (ties count
    half): the area under the ROC curve, threshold-free. None without both labels."""
    ranks = average_ranks(scores)
    matches = [r for r, m in zip(ranks, mismatch, strict=True) if not m]
    mismatches = len(scores) - len(matches)
    if not matches or not mismatches:
        return None
    u = sum(matches) - len(matches) * (len(matches) + 1) / 2
    return u / (len(matches) * mismatches)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when undefined (fewer
    than two pairs, or one side constant)."""
    if len(a) != len(b):
        raise ValueError("the two score lists differ in length")
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    mean = (len(a) + 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - mean) ** 2 for x in ra)
    var_b = sum((y - mean) ** 2 for y in rb)
    if not var_a or not var_b:
        return None
    return cov / math.sqrt(var_a * var_b)


def top_k_accuracy(
    ranked: Sequence[Sequence[str]], truth: Sequence[str | None], k: int
) -> float | None:
    """Share of listings with a true category that find it among their top `k` labels (labels
    compared as given: normalise both first); None when no listing has one."""
    judged = [(labels, t) for labels, t in zip(ranked, truth, strict=True) if t]
    if not judged:
        return None
    return sum(t in labels[:k] for labels, t in judged) / len(judged)


def flip_share(a: Sequence[bool | None], b: Sequence[bool | None]) -> float | None:
    """Share of verdicts that differ, among listings both sides gave one; None if none."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not both:
        return None
    return sum(x != y for x, y in both) / len(both)
