"""worker.scoring and worker.categories: the math on unit vectors, labels and label embeddings.

The only test double is `embed_texts` (strings hashed to fixed vectors), standing in for a model;
all the math under test runs for real and is checked against hand computations.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.backends.base import ModelInfo
from worker.categories import (
    DEFAULT_CATEGORIES_FILE,
    DEFAULT_TEMPLATES,
    CategoryIndex,
    normalise_label,
    read_categories,
)
from worker.scoring import (
    CategoryScore,
    category_mismatch,
    image_text_similarity,
    rank_categories,
)

DIM = 16


def info(scoring: str = "cosine", scale: float = 100.0, bias: float = 0.0) -> ModelInfo:
    return ModelInfo(
        embed_dim=DIM,
        has_text=True,
        scoring=scoring,  # type: ignore[arg-type]
        logit_scale=scale,
        logit_bias=bias,
        image_size=224,
    )


def unit_vectors(count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM))
    return torch.tensor(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def hashed_vector(text: str) -> torch.Tensor:
    """A fixed pseudo-random vector per string (not unit length: the index must normalise)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return torch.tensor(np.random.default_rng(seed).standard_normal(DIM), dtype=torch.float32)


class FakeEmbedder:
    """`embed_texts` for tests: records every call, returns one hashed vector per string."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([hashed_vector(text) for text in texts])


def ranked(*labels: str) -> list[CategoryScore]:
    """A ranking in the given order, best first."""
    return [CategoryScore(label, 1.0 / (i + 2)) for i, label in enumerate(labels)]


# --- image–text similarity -------------------------------------------------------------------


def test_cosine_similarity_equals_a_hand_computation() -> None:
    images = unit_vectors(5, seed=1)
    text = unit_vectors(1, seed=2)[0]

    scores = image_text_similarity(images, text, info("cosine"))

    expected = [
        sum(a * b for a, b in zip(image.tolist(), text.tolist(), strict=True)) for image in images
    ]
    assert scores.shape == (5,)
    assert scores.tolist() == pytest.approx(expected, abs=1e-9)
    assert all(-1.0 <= score <= 1.0 for score in scores.tolist())


def test_an_image_scored_against_its_own_embedding_has_cosine_one() -> None:
    vector = unit_vectors(1, seed=3)

    assert image_text_similarity(vector, vector[0], info()).item() == pytest.approx(1.0)


def test_sigmoid_scoring_applies_scale_and_bias_to_the_cosine() -> None:
    images = unit_vectors(4, seed=4)
    text = unit_vectors(1, seed=5)[0]
    siglip = info("sigmoid", scale=117.3, bias=-12.9)

    scores = image_text_similarity(images, text, siglip)

    cosines = [float(np.dot(image.numpy(), text.numpy())) for image in images]
    expected = [1 / (1 + math.exp(-(c * 117.3 - 12.9))) for c in cosines]
    assert scores.tolist() == pytest.approx(expected, abs=1e-9)
    assert all(0.0 <= score <= 1.0 for score in scores.tolist())


def test_sigmoid_of_a_cosine_at_minus_bias_over_scale_is_one_half() -> None:
    text = torch.zeros(DIM, dtype=torch.float64)
    text[0] = 1.0
    image = torch.zeros(1, DIM, dtype=torch.float64)
    image[0, 0], image[0, 1] = 0.1, math.sqrt(1 - 0.01)

    score = image_text_similarity(image, text, info("sigmoid", scale=10.0, bias=-1.0))

    assert score.item() == pytest.approx(0.5)


# --- zero-shot categories --------------------------------------------------------------------


def test_rank_categories_is_a_sorted_softmax_of_scaled_cosines() -> None:
    image = unit_vectors(1, seed=6)[0]
    label_vectors = unit_vectors(6, seed=7)
    labels = tuple(f"label-{i}" for i in range(6))

    result = rank_categories(image, label_vectors, labels, logit_scale=50.0)

    logits = [50.0 * float(np.dot(v.numpy(), image.numpy())) for v in label_vectors]
    exps = [math.exp(x - max(logits)) for x in logits]
    probabilities = [e / sum(exps) for e in exps]
    expected = sorted(zip(labels, probabilities, strict=True), key=lambda pair: -pair[1])
    assert [score.label for score in result] == [label for label, _ in expected]
    assert [score.score for score in result] == pytest.approx([p for _, p in expected], abs=1e-9)
    assert sum(score.score for score in result) == pytest.approx(1.0)
    assert [s.score for s in result] == sorted((s.score for s in result), reverse=True)


def test_rank_categories_puts_the_matching_label_first() -> None:
    label_vectors = unit_vectors(5, seed=8)
    labels = ("bag", "shoe", "lamp", "mug", "sofa")

    result = rank_categories(label_vectors[3], label_vectors, labels, logit_scale=100.0)

    assert result[0].label == "mug"
    assert isinstance(result[0].score, float)


def test_category_mismatch_is_none_without_a_claim() -> None:
    ranking = ranked("handbag", "wallet", "backpack", "shoe")

    assert category_mismatch(ranking, None) is None
    assert category_mismatch(ranking, "") is None


@pytest.mark.parametrize("claim", ["handbag", "car tyre", "backpack", "  HandBag ", "Car   TYRE"])
def test_category_mismatch_is_false_for_a_claim_in_the_top_three(claim: str) -> None:
    assert category_mismatch(ranked("handbag", "car tyre", "backpack", "shoe"), claim) is False


@pytest.mark.parametrize("claim", ["shoe", "lamp", "hand bag", "car-tyre"])
def test_category_mismatch_is_true_for_a_claim_outside_the_top_three(claim: str) -> None:
    assert category_mismatch(ranked("handbag", "car tyre", "backpack", "shoe"), claim) is True


def test_normalise_label_ignores_case_and_spacing() -> None:
    assert normalise_label("  Car \t Tyre\n") == "car tyre"


def test_default_categories_are_at_least_forty_unique_normalised_labels() -> None:
    written = [
        line
        for line in DEFAULT_CATEGORIES_FILE.read_text().splitlines()
        if line and not line.startswith("#")
    ]

    assert len(written) >= 40
    assert read_categories(None) == tuple(written)  # none dropped as a duplicate or renamed


def test_default_templates_each_hold_one_placeholder() -> None:
    assert DEFAULT_TEMPLATES
    assert all(template.count("{}") == 1 for template in DEFAULT_TEMPLATES)


def test_read_categories_without_a_file_gives_the_defaults() -> None:
    assert read_categories(None)[:3] == ("handbag", "backpack", "wallet")


def test_read_categories_parses_comments_blanks_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "categories.txt"
    lines = ["# our catalogue", "Handbag", "", "handbag   # the same again", "  Car   Tyre "]
    path.write_text("\n".join([*lines, "garden hose", ""]), encoding="utf-8")

    assert read_categories(path) == ("handbag", "car tyre", "garden hose")


@pytest.mark.parametrize("text", ["", "# nothing\n\n", "mug\nMUG\n# one label\n"])
def test_read_categories_refuses_fewer_than_two_labels(tmp_path: Path, text: str) -> None:
    path = tmp_path / "categories.txt"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ValueError, match="at least two"):
        read_categories(path)


# --- CategoryIndex ---------------------------------------------------------------------------


def test_category_index_averages_the_template_embeddings_of_each_label() -> None:
    embed = FakeEmbedder()
    templates = ("a photo of a {}.", "a {} for sale.")

    index = CategoryIndex(["Handbag", "mug"], templates, embed)

    assert index.labels == ("handbag", "mug")
    assert index.embeddings.shape == (2, DIM)
    for row, label in enumerate(index.labels):
        mean = (hashed_vector(f"a photo of a {label}.") + hashed_vector(f"a {label} for sale.")) / 2
        expected = mean / mean.norm()
        assert torch.allclose(index.embeddings[row], expected, atol=1e-6)
    assert len(embed.calls) == 1  # all prompts in one batch


def test_category_index_without_templates_uses_the_default_ones() -> None:
    embed = FakeEmbedder()

    index = CategoryIndex(["mug", "lamp"], (), embed)

    assert index.templates == DEFAULT_TEMPLATES
    assert embed.calls[0][: len(DEFAULT_TEMPLATES)] == [t.format("mug") for t in DEFAULT_TEMPLATES]


def test_with_claim_of_a_listed_category_returns_the_list_unchanged() -> None:
    embed = FakeEmbedder()
    index = CategoryIndex(["handbag", "mug"], ("{}",), embed)

    for claim in (None, "", "MUG", " Handbag "):
        labels, vectors = index.with_claim(claim)
        assert labels == ("handbag", "mug")
        assert vectors is index.embeddings
    assert len(embed.calls) == 1


def test_with_claim_appends_an_unknown_claim_once_and_caches_it() -> None:
    embed = FakeEmbedder()
    index = CategoryIndex(["handbag", "mug"], ("a photo of a {}.",), embed)

    labels, vectors = index.with_claim("Garden  Hose")
    again_labels, again_vectors = index.with_claim("garden hose")

    assert labels == again_labels == ("handbag", "mug", "garden hose")
    assert vectors.shape == (3, DIM)
    expected = hashed_vector("a photo of a garden hose.")
    assert torch.allclose(vectors[2], expected / expected.norm(), atol=1e-6)
    assert torch.equal(vectors[:2], index.embeddings)
    assert torch.equal(again_vectors, vectors)
    assert embed.calls[1:] == [["a photo of a garden hose."]]  # embedded once, then cached
    assert index.labels == ("handbag", "mug")  # the shared list is not extended


def test_a_claim_outside_the_list_can_be_ranked_and_judged() -> None:
    embed = FakeEmbedder()
    index = CategoryIndex(["handbag", "mug", "lamp", "sofa"], ("{}",), embed)
    labels, vectors = index.with_claim("garden hose")

    ranking = rank_categories(vectors[-1], vectors, labels, logit_scale=100.0)

    assert ranking[0].label == "garden hose"
    assert category_mismatch(ranking, "Garden Hose") is False


def test_the_cache_of_claims_outside_the_list_is_bounded_and_keeps_the_recent_ones() -> None:
    embed = FakeEmbedder()
    index = CategoryIndex(["handbag", "mug"], ("{}",), embed)
    index.max_extra = 3

    for claim in ["kite", "sled", "kite", "drum", "harp", "kite", "oboe"]:
        labels, _ = index.with_claim(claim)
        assert labels[-1] == claim

    assert len(index._extra) == 3
    assert list(index._extra) == ["harp", "kite", "oboe"]  # "kite" kept: it was used again
    embedded = [call[0] for call in embed.calls[1:]]
    assert embedded == ["kite", "sled", "drum", "harp", "oboe"]  # "kite" never embedded twice
