"""Thresholds from labelled listings: the model-wide one, and one per claimed category where a
category has enough labelled listings and its own threshold does better on them.

Pure: similarities in, a plan out (`calibrate_command` scores the listings and records it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from contract.thresholds import Thresholds
from listing_vision.toolkit.metrics import Detection, best_threshold, detection

DEFAULT_MIN_PER_CATEGORY = 50  # labelled listings a category needs for a threshold of its own
MIN_PER_LABEL = 5  # ... of which at least this many matches and this many mismatches


class CalibrationError(ValueError):
    """No threshold can be derived from these listings; the message says why."""


@dataclass(frozen=True)
class Judged:
    """One labelled listing as the model scored it."""

    similarity: float
    mismatch: bool
    claimed: str | None  # the seller's category, normalised


@dataclass(frozen=True)
class Objective:
    """Maximise F1, or (with `min_precision`) recall among thresholds reaching that precision."""

    min_precision: float | None = None

    def __str__(self) -> str:
        return "f1" if self.min_precision is None else f"precision>={self.min_precision:g}"


@dataclass(frozen=True)
class GroupResult:
    """A threshold of the plan (`category` None: model-wide) and mismatch detection on its
    listings with the thresholds in force before (None: the model had no threshold) and after."""

    category: str | None
    threshold: float
    listings: int
    mismatches: int
    threshold_before: float | None
    before: Detection | None
    after: Detection


@dataclass(frozen=True)
class CalibrationPlan:
    """What a calibration would record, and what it would change."""

    objective: Objective
    model: GroupResult  # over every labelled listing, per-listing thresholds before and after
    categories: list[GroupResult]
    kept_model_wide: dict[str, str] = field(default_factory=dict)  # category -> why

    @property
    def thresholds(self) -> Thresholds:
        """The table the workers will judge by."""
        return _table(self.model.threshold, self.categories)


def plan_calibration(
    judged: Sequence[Judged],
    in_force: Thresholds,
    objective: Objective,
    min_per_category: int = DEFAULT_MIN_PER_CATEGORY,
) -> CalibrationPlan:
    """Derive the thresholds; `CalibrationError` when the labels cannot support one."""
    mismatches = sum(j.mismatch for j in judged)
    if not mismatches or mismatches == len(judged):
        raise CalibrationError(
            f"{len(judged)} scored listings, {mismatches} of them mismatches: "
            "calibration needs both matches and mismatches"
        )
    model_wide = best_threshold(
        [j.similarity for j in judged], [j.mismatch for j in judged], objective.min_precision
    )
    if model_wide is None or model_wide.threshold is None:
        raise CalibrationError(
            f"no threshold reaches {objective} on these listings"
            if objective.min_precision is not None
            else "no threshold catches a mismatch on these listings"
        )
    categories: list[GroupResult] = []
    kept: dict[str, str] = {}
    for category, members in sorted(_by_category(judged).items()):
        why_not = _too_few(members, min_per_category)
        own = None if why_not else _own_threshold(members, model_wide.threshold, objective)
        if own is None:
            kept[category] = why_not or "its own threshold does no better"
            continue
        categories.append(_group(category, own, members, in_force))
    table = _table(model_wide.threshold, categories)
    return CalibrationPlan(
        objective,
        GroupResult(
            None,
            model_wide.threshold,
            len(judged),
            mismatches,
            in_force.default,
            _detect(judged, in_force),
            _detect_required(judged, table),
        ),
        categories,
        kept,
    )


def _table(model_wide: float, categories: Sequence[GroupResult]) -> Thresholds:
    return Thresholds(model_wide, {g.category: g.threshold for g in categories if g.category})


def _by_category(judged: Sequence[Judged]) -> dict[str, list[Judged]]:
    groups: dict[str, list[Judged]] = defaultdict(list)
    for item in judged:
        if item.claimed:
            groups[item.claimed].append(item)
    return groups


def _too_few(members: Sequence[Judged], min_per_category: int) -> str | None:
    mismatches = sum(j.mismatch for j in members)
    matches = len(members) - mismatches
    if len(members) < min_per_category or min(matches, mismatches) < MIN_PER_LABEL:
        return f"too few labels ({matches} match, {mismatches} mismatch)"
    return None


def _own_threshold(
    members: Sequence[Judged], model_wide: float, objective: Objective
) -> float | None:
    """The category's best threshold, if it beats the model-wide one on its own listings."""
    scores = [j.similarity for j in members]
    labels = [j.mismatch for j in members]
    own = best_threshold(scores, labels, objective.min_precision)
    if own is None or own.threshold is None:
        return None
    shared = detection([s < model_wide for s in scores], labels)
    if objective.min_precision is None:
        better = own.f1 > shared.f1 + 1e-12
    else:
        reaches = shared.precision >= objective.min_precision
        better = not reaches or (own.recall, own.f1) > (shared.recall, shared.f1)
    return own.threshold if better else None


def _group(
    category: str, threshold: float, members: Sequence[Judged], in_force: Thresholds
) -> GroupResult:
    mine = Thresholds(threshold)
    return GroupResult(
        category,
        threshold,
        len(members),
        sum(j.mismatch for j in members),
        in_force.for_category(category),
        _detect(members, in_force),
        _detect_required(members, mine),
    )


def _detect(judged: Sequence[Judged], thresholds: Thresholds) -> Detection | None:
    """Detection with each listing judged by its category's threshold (None without one)."""
    verdicts = [thresholds.is_match(j.similarity, j.claimed) for j in judged]
    if any(v is None for v in verdicts):
        return None
    return detection([not v for v in verdicts], [j.mismatch for j in judged])


def _detect_required(judged: Sequence[Judged], thresholds: Thresholds) -> Detection:
    found = _detect(judged, thresholds)
    if found is None:
        raise AssertionError("a derived threshold table judges every listing")
    return found
