"""One listing through `ListingAnalyzer` with real tiny models and real files (no database)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.errors import TransientError
from contract.registry import ModelSpec
from contract.thresholds import Thresholds
from db.records import ListingRecord
from tests import images
from tests.tiny_models import save_tiny_dinov2, save_tiny_open_clip
from worker.analysis import ListingAnalyzer
from worker.backends import create_backend
from worker.categories import CategoryIndex
from worker.chunk_analysis import ChunkAnalyzer
from worker.fetch import FetchPolicy
from worker.inference import InferenceService
from worker.scorer import ListingScorer


def analyzer(
    spec: ModelSpec,
    root: Path,
    with_categories: bool,
    input_path: str = "auto",
    decode: str = "auto",
) -> ListingAnalyzer:
    backend = create_backend(spec, "cpu")
    backend.load()
    service = InferenceService(
        backend, max_size=8, max_wait_s=0.01, input_path=input_path, decode=decode
    )
    categories = (
        CategoryIndex(["mug", "lamp", "hat"], (), service.embed_texts) if with_categories else None
    )
    return ListingAnalyzer(
        service=service,
        scorer=ListingScorer(backend.info, categories, Thresholds(spec.threshold)),
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
    good = (folder / "red.jpg").read_bytes()
    scan = good.index(b"\xff\xda") + 100  # a stray frame marker mid-scan: a whole-looking JPEG
    (folder / "damaged.jpg").write_bytes(good[:scan] + b"\xff\xc0\xff\xff" + good[scan + 4 :])
    images.save(images.product_image("green"), folder / "green.png")
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


@pytest.mark.parametrize("kind", ["open_clip", "hf_dino"])
def test_the_tensor_input_path_scores_as_the_backends_own_transform(
    root: Path, tmp_path: Path, kind: str
) -> None:
    """LV_INPUT_PATH=tensor (the CUDA default) run on the CPU: resize, crop and normalise as
    batched tensor operations give the embeddings and scores of the PIL path."""
    if kind == "open_clip":
        name = f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}"
    else:
        name = str(save_tiny_dinov2(tmp_path / "dino"))
    spec = ModelSpec("m", kind, name, threshold=0.0)  # type: ignore[arg-type]
    text = kind == "open_clip"
    pil = analyzer(spec, root, with_categories=text, input_path="pil")
    tensor = analyzer(spec, root, with_categories=text, input_path="tensor")
    assert pil.service.input_spec is None and tensor.service.input_spec is not None

    wanted = listing(root, "red.jpg", "blue.jpg")
    by_pil, by_tensor = pil.analyze(wanted), tensor.analyze(wanted)

    assert by_pil.new_embeddings.keys() == by_tensor.new_embeddings.keys()
    for sha, vector in by_pil.new_embeddings.items():
        a, b = torch.tensor(vector), torch.tensor(by_tensor.new_embeddings[sha])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.999
    if text:
        assert by_tensor.result.similarity == pytest.approx(by_pil.result.similarity, abs=2e-3)
        assert by_tensor.result.best_image == by_pil.result.best_image


def test_jpegs_decoded_in_the_batch_give_the_pillow_paths_facts_scores_and_errors(
    root: Path, tmp_path: Path
) -> None:
    """LV_DECODE=device run on the CPU (libjpeg where CUDA has nvJPEG): JPEGs reach the batch
    encoded; their stored facts (size, blur, brightness), embeddings, score and errors equal
    the Pillow path's. The PNG and the truncated JPEG are decoded by Pillow in the job."""
    name = f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}"
    spec = ModelSpec("m", "open_clip", name, threshold=0.0)
    pil = analyzer(spec, root, with_categories=True, input_path="tensor", decode="pil")
    device = analyzer(spec, root, with_categories=True, input_path="tensor", decode="device")
    assert device.service.decodes_on_device and not pil.service.decodes_on_device
    names = ("red.jpg", "damaged.jpg", "green.png", "broken.jpg", "blue.jpg")

    by_pil, by_device = pil.analyze(listing(root, *names)), device.analyze(listing(root, *names))

    assert [i.error is None for i in by_device.images] == [True, False, True, False, True]
    assert "corrupt or truncated" in (by_device.images[1].error or "")
    for want, got in zip(by_pil.images, by_device.images, strict=True):
        assert (got.error is None) == (want.error is None)
        if want.facts is None or got.facts is None:
            continue
        assert (got.facts.width, got.facts.height) == (want.facts.width, want.facts.height)
        assert (got.facts.format, got.facts.bytes) == (want.facts.format, want.facts.bytes)
        assert got.facts.blur == pytest.approx(want.facts.blur, rel=2e-3)
        assert got.facts.brightness == pytest.approx(want.facts.brightness, abs=1e-4)
    assert by_device.result.images_failed == by_pil.result.images_failed == 2
    assert by_device.new_embeddings.keys() == by_pil.new_embeddings.keys()
    for sha, vector in by_pil.new_embeddings.items():
        a, b = torch.tensor(vector), torch.tensor(by_device.new_embeddings[sha])
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.999
    assert by_device.result.similarity == pytest.approx(by_pil.result.similarity, abs=2e-3)
    assert by_device.result.error == by_pil.result.error


def test_a_listing_whose_only_jpeg_fails_in_the_batch_is_failed(root: Path, tmp_path: Path) -> None:
    name = f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}"
    spec = ModelSpec("m", "open_clip", name, threshold=0.0)
    device = analyzer(spec, root, with_categories=False, input_path="tensor", decode="device")

    result = device.analyze(listing(root, "damaged.jpg"))

    assert result.result.status == "failed"
    assert "corrupt or truncated" in (result.result.error or "")
    assert result.new_embeddings == {} and result.images[0].facts is None


def test_an_attempt_past_its_time_limit_is_a_transient_failure(root: Path) -> None:
    """SPEC: LV_TASK_TIME_LIMIT bounds one attempt from claim to commit; past it, the attempt
    ends as a transient failure (retried), whether before the model call or waiting for it."""
    slow = ModelSpec("slow", "sim", "PE-Core-bigG-14-448", threshold=0.0)  # ~0.12 s a call
    analysis = analyzer(slow, root, with_categories=False)

    with pytest.raises(TransientError, match="LV_TASK_TIME_LIMIT"):
        analysis.analyze(listing(root, "red.jpg"), deadline=time.monotonic() - 1)
    with pytest.raises(TransientError, match="did not answer"):
        analysis.analyze(listing(root, "blue.jpg"), deadline=time.monotonic() + 0.03)
    assert analysis.analyze(listing(root, "red.jpg"), deadline=time.monotonic() + 30).result


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_a_group_of_listings_comes_out_as_each_listing_alone(
    root: Path, tmp_path: Path, decode: str
) -> None:
    """A group message's listings (the chunk analyzer's `analyze_new`) get the rows and
    images a single job gets, JPEGs decoded in the job or in the batch (LV_DECODE)."""
    name = f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}"
    spec = ModelSpec("m", "open_clip", name, threshold=0.0)
    single = analyzer(spec, root, with_categories=True, input_path="tensor", decode=decode)
    assert single.service.decodes_on_device == (decode == "device")
    group = ChunkAnalyzer(
        single.service,
        single.scorer,
        single.policy,
        single.max_pixels,
        single.executor,
        single.lookup_cached,
        "m",
        30.0,
        group_size=8,
    )
    wanted = [
        ("red.jpg", "damaged.jpg", "green.png"),
        ("blue.jpg",),
        ("damaged.jpg",),
        ("broken.jpg", "red.jpg"),
    ]
    records = [
        replace(listing(root, *names), listing_id=f"g-{n}") for n, names in enumerate(wanted)
    ]

    found = group.analyze_new(records, deadline=time.monotonic() + 60)

    assert not found.transient and len(found.outcomes) == len(records)
    by_id = {outcome.listing_id: outcome for outcome in found.outcomes}
    for record in records:
        alone, together = single.analyze(record), by_id[record.listing_id]
        assert together.result.status == alone.result.status, record.listing_id
        assert together.result.error == alone.result.error
        assert together.result.images_failed == alone.result.images_failed
        if alone.result.similarity is not None:
            assert together.result.similarity == pytest.approx(alone.result.similarity, abs=1e-4)
        assert [i.error for i in together.images] == [i.error for i in alone.images]
        for want, got in zip(alone.images, together.images, strict=True):
            if want.facts is not None and got.facts is not None:
                assert got.facts.blur == pytest.approx(want.facts.blur, rel=1e-6)
                assert got.facts.brightness == pytest.approx(want.facts.brightness, abs=1e-6)
        assert together.new_embeddings.keys() == alone.new_embeddings.keys()
    assert by_id["g-2"].result.status == "failed"  # its only JPEG fails in the batch


def test_an_item_the_model_refuses_fails_only_its_listing_in_a_group(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request per listing: the batcher splits a failing batch down to the request that
    fails, so a listing whose text the model refuses (injected) is retried alone, and the
    rest of its group is scored."""
    name = f"local-dir:{save_tiny_open_clip(tmp_path / 'c')}"
    spec = ModelSpec("m", "open_clip", name, threshold=0.0)
    single = analyzer(spec, root, with_categories=True)
    group = ChunkAnalyzer(
        single.service,
        single.scorer,
        single.policy,
        single.max_pixels,
        single.executor,
        single.lookup_cached,
        "m",
        30.0,
        group_size=8,
    )
    backend = single.service.backend
    real = backend.embed_texts

    def refuse_poison(texts: Any) -> torch.Tensor:
        if any("POISON" in text for text in texts):
            raise RuntimeError("injected: the text tower refuses this one")
        return real(texts)

    monkeypatch.setattr(backend, "embed_texts", refuse_poison)
    records = [
        replace(listing(root, "red.jpg"), listing_id="ok-1"),
        replace(listing(root, "blue.jpg"), listing_id="bad", title="POISON mug"),
        replace(listing(root, "green.png"), listing_id="ok-2"),
    ]

    found = group.analyze_new(records, deadline=time.monotonic() + 60)

    assert set(found.transient) == {"bad"}
    assert "injected" in found.transient["bad"]
    assert sorted(o.listing_id for o in found.outcomes) == ["ok-1", "ok-2"]
    assert all(o.result.status == "ok" for o in found.outcomes)
