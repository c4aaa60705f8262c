"""Reciprocal rank fusion against sums worked out by hand."""

from __future__ import annotations

import pytest

from listing_vision.toolkit.fusion import reciprocal_rank_fusion


def test_items_high_in_both_rankings_win() -> None:
    fused = reciprocal_rank_fusion({"a": ["x", "y", "z"], "b": ["y", "x", "w"]}, k=60)
    assert [f.item for f in fused] == ["x", "y", "w", "z"]  # ties (x, y; w, z) by item
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[0].ranks == {"a": 1, "b": 2}
    assert fused[2].score == pytest.approx(1 / 63) and fused[2].ranks == {"b": 3}


def test_an_item_in_one_ranking_can_lose_to_one_in_both() -> None:
    # w: first in one ranking only, 1/61; v: third in both, 2/63 > 1/61.
    fused = reciprocal_rank_fusion({"a": ["w", "q", "v"], "b": ["r", "s", "v"]}, k=60)
    assert fused[0].item == "v" and fused[0].score == pytest.approx(2 / 63)


def test_a_repeated_item_counts_at_its_best_rank() -> None:
    fused = reciprocal_rank_fusion({"a": ["x", "x"]}, k=1)
    assert len(fused) == 1 and fused[0].score == pytest.approx(1 / 2)
