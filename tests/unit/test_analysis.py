"""One listing through `ListingAnalyzer` with real tiny models and real files (no database)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contract.registry import ModelSpec
from db.records import ListingRecord
from tests import images
from tests.tiny_models import save_tiny_dinov2, save_tiny_open_clip
from worker.analysis import ListingAnalyzer
from worker.backends import create_backend
from worker.categories import CategoryIndex
from worker.fetch import FetchPolicy
from worker.inference import InferenceService
from worker.scorer import ListingScorer


def analyzer(spec: ModelSpec, root: Path, with_categories: bool) -> ListingAnalyzer:
    backend = create_backend(spec, "cpu")
    backend.load()
    service = InferenceService(backend, max_size=8, max_wait_s=0.01)
    categories = (
        CategoryIndex(["mug", "lamp", "hat"], (), service.embed_texts) if with_categories else None
    )
    return ListingAnalyzer(
        service=service,
        scorer=ListingScorer(backend.info, categories, spec.threshold),
        policy=FetchPolicy(max_bytes=1_000_000, timeout=5, file_roots=(root,)),
        max_pixels=10_000_000,
        executor=ThreadPoolExecutor(4),
        lookup_cached=lambda shas: {},
        model_timeout=30,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    images.save(images.product_image("red"), folder / "red.jpg")
    images.save(images.product_image("blue", "square"), folder / "blue.jpg")
    images.truncated_jpeg(folder / "broken.jpg")
    return folder


def listing(root: Path, *names: str, category: str | None = None) -> ListingRecord:
    return ListingRecord("l-1", "red thing", None, category, [(root / n).as_uri() for n in names])


def test_dino_listing_is_ok_with_embeddings_and_no_text_scores(root: Path, tmp_path: Path) -> None:
    spec = ModelSpec("dino", "hf_dino", str(save_tiny_dinov2(tmp_path / "dino")))
    result = analyzer(spec, root, with_categories=False).analyze(listing(root, "red.jpg"))
    assert result.result.status == "ok"
    assert result.result.similarity is None and result.result.categories is None
    assert result.result.is_match is None and result.result.best_image == 0
    assert len(result.new_embeddings) == 1
    assert len(next(iter(result.new_embeddings.values()))) == 32


def test_one_bad_image_of_several_is_noted_and_the_listing_still_scored(
    root: Path, tmp_path: Path
) -> None:
    spec = ModelSpec(
        "clip", "open_clip", f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}", threshold=0.0
    )
    result = analyzer(spec, root, with_categories=True).analyze(
        listing(root, "red.jpg", "broken.jpg", "blue.jpg", category="spaceship")
    )
    assert result.result.status == "ok"
    assert (result.result.images_total, result.result.images_failed) == (3, 1)
    assert "1 of 3 images failed: image 2" in (result.result.error or "")
    assert result.result.best_image in (0, 2)
    assert [c["label"] for c in result.result.categories or []] != []
    assert "spaceship" not in [c["label"] for c in result.result.categories or []]
    assert result.result.category_mismatch is not None
    assert [image.error is not None for image in result.images] == [False, True, False]


def test_a_listing_whose_every_image_fails_is_failed_with_each_reason(
    root: Path, tmp_path: Path
) -> None:
    spec = ModelSpec("clip", "open_clip", f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}")
    result = analyzer(spec, root, with_categories=True).analyze(
        listing(root, "broken.jpg", "missing.jpg")
    )
    assert result.result.status == "failed"
    assert result.result.error is not None
    assert result.result.error.startswith("all images failed: image 1")
    assert "image 2" in result.result.error and "no such file" in result.result.error
