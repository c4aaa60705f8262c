"""Calibration plans from hand-made similarities, the threshold table, and labelled files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.thresholds import Thresholds
from listing_vision.toolkit.calibration import (
    CalibrationError,
    Judged,
    Objective,
    plan_calibration,
)
from listing_vision.toolkit.labelled import LabelledError, read_labelled


def _group(category: str, matches: list[float], mismatches: list[float]) -> list[Judged]:
    return [Judged(s, False, category) for s in matches] + [
        Judged(s, True, category) for s in mismatches
    ]


# Mugs separate at 0.55, hats at 0.275: no single threshold separates both.
MUGS = _group("mug", [0.60, 0.62, 0.64, 0.66, 0.68, 0.70], [0.40, 0.42, 0.44, 0.46, 0.48, 0.50])
HATS = _group("hat", [0.30, 0.31, 0.32, 0.33, 0.34, 0.35], [0.20, 0.21, 0.22, 0.23, 0.24, 0.25])


def test_thresholds_judge_by_the_claimed_category_else_the_model_wide_one() -> None:
    table = Thresholds.from_recorded(0.25, {None: 0.3, "Water  Bottle": 0.5})
    assert table.default == 0.3
    assert table.for_category("water bottle") == 0.5
    assert table.is_match(0.4, "WATER bottle") is False
    assert table.is_match(0.4, "mug") is True
    assert table.is_match(0.4, None) is True
    assert Thresholds.from_recorded(0.25, {}).default == 0.25
    assert Thresholds(None).is_match(0.9, "mug") is None


def test_a_category_with_enough_labels_gets_its_own_better_threshold() -> None:
    # The model-wide optimum (0.55: F1 0.8) already separates the mugs; hats need 0.275.
    plan = plan_calibration(MUGS + HATS, Thresholds(0.1), Objective(), min_per_category=12)
    assert plan.model.threshold == pytest.approx(0.55)
    own = {g.category: g.threshold for g in plan.categories}
    assert own == {"hat": pytest.approx(0.275)}
    assert "no better" in plan.kept_model_wide["mug"]
    (hat,) = plan.categories
    assert (hat.listings, hat.mismatches, hat.threshold_before) == (12, 6, 0.1)
    assert hat.after.f1 == 1.0
    assert plan.model.before is not None and plan.model.before.f1 == 0.0  # 0.1 flags nothing
    assert plan.model.after.f1 == 1.0  # each category judged by its own threshold
    assert plan.model.threshold_before == 0.1
    assert plan.thresholds.for_category("Hat") == pytest.approx(0.275)


def test_categories_with_too_few_labels_keep_the_model_wide_threshold() -> None:
    plan = plan_calibration(MUGS + HATS, Thresholds(0.1), Objective(), min_per_category=50)
    assert plan.categories == []
    assert set(plan.kept_model_wide) == {"hat", "mug"}
    assert plan.kept_model_wide["mug"] == "too few labels (6 match, 6 mismatch)"
    # One threshold for both: the best F1 over all 24 listings, better than flagging none.
    assert 0.25 < plan.model.threshold < 0.6
    assert plan.model.after.f1 > 0.6


def test_min_precision_objective_and_an_unreachable_one() -> None:
    judged = [Judged(0.1, True, None), Judged(0.2, False, None), Judged(0.3, True, None)]
    judged += [Judged(0.4, False, None)]
    plan = plan_calibration(judged, Thresholds(None), Objective(min_precision=1.0))
    assert plan.model.threshold == pytest.approx(0.15)
    assert plan.model.before is None and plan.model.threshold_before is None
    assert str(plan.objective) == "precision>=1"
    with pytest.raises(CalibrationError, match="no threshold reaches precision>=1"):
        plan_calibration(
            [Judged(0.1, False, None), Judged(0.2, True, None)],
            Thresholds(0.5),
            Objective(min_precision=1.0),
        )


def test_labels_of_one_kind_only_cannot_be_calibrated() -> None:
    with pytest.raises(CalibrationError, match="both matches and mismatches"):
        plan_calibration([Judged(0.3, False, None)], Thresholds(0.2), Objective())


def _line(**fields: object) -> str:
    event = {"listing_id": "a", "title": "red mug", "image_url": "https://x.test/a.jpg"}
    return json.dumps({**event, **fields})


def test_labelled_file_reads_labels_categories_and_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "labelled.jsonl"
    path.write_text(
        _line(label="mismatch", category="Mug", true_category=" Water  Bottle ")
        + "\n\n"
        + _line(listing_id="b", label="match")
        + "\n"
    )
    found = read_labelled(path, ())
    assert [item.mismatch for item in found.listings] == [True, False]
    assert found.listings[0].claimed == "mug"
    assert found.listings[0].true_category == "water bottle"
    assert found.listings[1].true_category is None
    assert found.mismatches == 1 and len(found.sha256) == 64


def test_labelled_file_with_bad_lines_is_refused_naming_each(tmp_path: Path) -> None:
    path = tmp_path / "labelled.jsonl"
    path.write_text(
        "\n".join(
            [
                _line(label="match"),
                _line(listing_id="b", label="maybe"),
                _line(listing_id="c"),
                _line(listing_id="a", label="match"),
                _line(listing_id="d", label="match", image_url="file:///etc/passwd"),
                "{not json",
            ]
        )
    )
    with pytest.raises(LabelledError) as refused:
        read_labelled(path, ())
    message = str(refused.value)
    assert "5 bad line(s)" in message
    assert 'line 2 (b): label: must be "match" or "mismatch"' in message
    assert "line 3 (c): label" in message
    assert "line 4 (a): listing_id: listed twice" in message
    assert "line 5 (d): image_urls" in message
    assert "line 6: not valid JSON" in message


def test_missing_or_empty_labelled_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabelledError, match="cannot read"):
        read_labelled(tmp_path / "none.jsonl", ())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LabelledError, match="no labelled listings"):
        read_labelled(tmp_path / "empty.jsonl", ())
