"""worker.scorer.ListingScorer: a listing's verdict from its vectors. The mutation probe of
issue 14 found `is_match` and the best image asserted only end to end; here a wrong threshold
comparison, a best image taken by index instead of position, or categories ranked for the
wrong image each fail a test. Vectors are built by hand; the math runs for real."""

from __future__ import annotations

import math

import pytest
import torch

from contract.thresholds import Thresholds
from db.records import ListingRecord
from tests.unit.test_scoring import FakeEmbedder, info
from worker.categories import CategoryIndex
from worker.image_fetch import FailedImage
from worker.scorer import ListingScorer, UsableImages

LISTING = ListingRecord("l-1", "a lamp", None, None, [f"http://x/{i}.jpg" for i in range(6)])


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


@pytest.fixture
def index() -> CategoryIndex:
    return CategoryIndex(["mug", "lamp", "tent"], ("{}",), FakeEmbedder())


def listing_images(index: CategoryIndex) -> tuple[UsableImages, torch.Tensor]:
    """Three usable images at positions 0, 2 and 5 (1, 3 and 4 failed), each a category's own
    vector (mug, lamp, tent); the text sits nearest the lamp, the second usable image."""
    mug, lamp, tent = (unit(index.embeddings[i].float()) for i in range(3))
    images = UsableImages([0, 2, 5], ["a", "b", "c"], torch.stack([mug, lamp, tent]))
    text = unit(lamp + 0.3 * mug)
    return images, text


FAILED = [FailedImage(p, f"http://x/{p}.jpg", "HTTP 404") for p in (1, 3, 4)]


def test_the_best_image_is_the_position_of_the_usable_image_closest_to_the_text(
    index: CategoryIndex,
) -> None:
    images, text = listing_images(index)
    scorer = ListingScorer(info(), index, Thresholds(0.5))

    similarity = scorer.similarity(images, text)
    result = scorer.result(LISTING, images, FAILED, similarity)

    expected = [float(images.vectors[i] @ text) for i in range(3)]
    assert similarity.best == 1
    assert result.best_image == 2  # its position among all six URLs, not its index (1)
    assert result.similarity == pytest.approx(max(expected), abs=1e-6)
    assert (result.images_total, result.images_failed) == (6, 3)


def test_categories_are_those_of_the_best_image_not_the_first(index: CategoryIndex) -> None:
    images, text = listing_images(index)
    scorer = ListingScorer(info(), index, Thresholds(0.5))

    result = scorer.result(LISTING, images, FAILED, scorer.similarity(images, text))

    assert result.top_category == "lamp"  # the first usable image would say "mug"
    assert result.categories is not None and result.categories[0]["label"] == "lamp"


def test_is_match_is_the_similarity_at_or_above_the_threshold(index: CategoryIndex) -> None:
    images, text = listing_images(index)
    value = ListingScorer(info(), index, Thresholds(0.0)).similarity(images, text).value

    def verdict(threshold: float | None) -> bool | None:
        scorer = ListingScorer(info(), index, Thresholds(threshold))
        return scorer.result(LISTING, images, [], scorer.similarity(images, text)).is_match

    assert verdict(value) is True  # at the threshold: a match
    assert verdict(math.nextafter(value, math.inf)) is False  # a hair above it: not
    assert verdict(value - 0.01) is True
    assert verdict(None) is None  # no calibrated threshold: no verdict


def test_sigmoid_models_judge_the_sigmoid_of_the_best_cosine(index: CategoryIndex) -> None:
    images, text = listing_images(index)
    scorer = ListingScorer(info("sigmoid", scale=10.0, bias=-5.0), index, Thresholds(0.5))

    result = scorer.result(LISTING, images, [], scorer.similarity(images, text))

    cosine = float(images.vectors[1] @ text)
    assert result.similarity == pytest.approx(1 / (1 + math.exp(-(10.0 * cosine - 5.0))))
    assert result.best_image == 2
    assert result.is_match == (result.similarity >= 0.5)


def test_an_image_only_model_gives_no_similarity_and_no_verdict(index: CategoryIndex) -> None:
    images, _ = listing_images(index)
    scorer = ListingScorer(info(), None, Thresholds(0.5))

    result = scorer.result(LISTING, images, FAILED, None)

    assert result.status == "ok"
    assert result.similarity is None and result.is_match is None and result.top_category is None
    assert result.best_image == 0  # the first usable image stands for the listing
