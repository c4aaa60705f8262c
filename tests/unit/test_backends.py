"""Every backend, built tiny through its library's real save/load code, scores exactly as the
library's own reference computation does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from contract.registry import ModelSpec
from tests.images import product_image
from tests.tiny_models import (
    save_tiny_dinov2,
    save_tiny_hf_clip,
    save_tiny_hf_siglip,
    save_tiny_open_clip,
)
from worker.backends import create_backend
from worker.backends.base import ModelBackend
from worker.inference import EmbedRequest, InferenceService
from worker.scoring import image_text_similarity

TEXTS = ["red round mug", "a blue square box for storage", "green lamp"]
COLOURS = ["red", "blue", "green", "gold", "purple", "teal", "black", "orange"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backends")
    return {
        "open_clip": save_tiny_open_clip(root / "oc-clip"),
        "open_clip_siglip": save_tiny_open_clip(root / "oc-siglip", siglip=True),
        "hf_clip": save_tiny_hf_clip(root / "hf-clip"),
        "hf_siglip": save_tiny_hf_siglip(root / "hf-siglip"),
        "hf_dino": save_tiny_dinov2(root / "hf-dino"),
    }


def backend(kind: str, path: Path, **spec: object) -> ModelBackend:
    name = f"local-dir:{path}" if kind.startswith("open_clip") else str(path)
    backend_name = "open_clip" if kind.startswith("open_clip") else kind
    loaded = create_backend(ModelSpec("t", backend_name, name, **spec))  # type: ignore[arg-type]
    loaded.load()
    return loaded


def images() -> list[Image.Image]:
    shapes = ["circle", "square", "triangle"]
    return [product_image(c, shapes[i % 3], (64 + i, 48 + 2 * i)) for i, c in enumerate(COLOURS)]


def our_scores(model: ModelBackend, image: Image.Image, texts: list[str]) -> torch.Tensor:
    image_vector = model.embed_images(model.preprocess(image)[None])
    text_vectors = model.embed_texts(texts)
    return torch.stack(
        [image_text_similarity(image_vector, t, model.info)[0] for t in text_vectors]
    )


@torch.no_grad()
def test_open_clip_clip_style_scores_are_open_clips_cosine(model_dirs: dict[str, Path]) -> None:
    import open_clip

    name = f"local-dir:{model_dirs['open_clip']}"
    reference, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model = backend("open_clip", model_dirs["open_clip"])
    assert model.info.scoring == "cosine"
    for image in images()[:3]:
        img = reference.eval().encode_image(preprocess(image)[None], normalize=True)
        txt = reference.encode_text(tokenizer(TEXTS), normalize=True)
        expected = (img @ txt.T)[0]
        assert torch.allclose(our_scores(model, image, TEXTS), expected, atol=1e-3)


@torch.no_grad()
def test_open_clip_siglip_style_scores_are_sigmoid_of_the_models_own_logits(
    model_dirs: dict[str, Path],
) -> None:
    import open_clip

    name = f"local-dir:{model_dirs['open_clip_siglip']}"
    reference, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model = backend("open_clip_siglip", model_dirs["open_clip_siglip"])
    assert model.info.scoring == "sigmoid"
    for image in images()[:3]:
        image_features, text_features, scale, bias = reference.eval()(
            preprocess(image)[None], tokenizer(TEXTS)
        )
        expected = torch.sigmoid(image_features @ text_features.T * scale + bias)[0]
        assert torch.allclose(our_scores(model, image, TEXTS), expected, atol=1e-3)


@torch.no_grad()
def test_hf_clip_scores_are_logits_per_image_over_the_logit_scale(
    model_dirs: dict[str, Path],
) -> None:
    from transformers import AutoModel, AutoProcessor

    reference = AutoModel.from_pretrained(model_dirs["hf_clip"]).eval()
    processor = AutoProcessor.from_pretrained(model_dirs["hf_clip"])
    model = backend("hf_clip", model_dirs["hf_clip"])
    assert model.info.scoring == "cosine"
    for image in images()[:3]:
        inputs = processor(text=TEXTS, images=image, padding=True, return_tensors="pt")
        expected = reference(**inputs).logits_per_image[0] / reference.logit_scale.exp()
        assert torch.allclose(our_scores(model, image, TEXTS), expected, atol=1e-3)


@torch.no_grad()
def test_hf_siglip_scores_are_sigmoid_of_logits_per_image_with_max_length_padding(
    model_dirs: dict[str, Path],
) -> None:
    from transformers import AutoModel, AutoProcessor

    reference = AutoModel.from_pretrained(model_dirs["hf_siglip"]).eval()
    processor = AutoProcessor.from_pretrained(model_dirs["hf_siglip"])
    model = backend("hf_siglip", model_dirs["hf_siglip"])
    assert model.info.scoring == "sigmoid"
    assert model.info.logit_bias == pytest.approx(-1.5)
    for image in images()[:3]:
        inputs = processor(text=TEXTS, images=image, padding="max_length", return_tensors="pt")
        expected = torch.sigmoid(reference(**inputs).logits_per_image[0])
        assert torch.allclose(our_scores(model, image, TEXTS), expected, atol=1e-3)


@torch.no_grad()
def test_hf_dino_embeds_the_cls_token_after_the_final_layer_norm(
    model_dirs: dict[str, Path],
) -> None:
    from transformers import AutoImageProcessor, AutoModel

    reference = AutoModel.from_pretrained(model_dirs["hf_dino"]).eval()
    processor = AutoImageProcessor.from_pretrained(model_dirs["hf_dino"])
    cls_model = backend("hf_dino", model_dirs["hf_dino"])
    mean_model = backend("hf_dino", model_dirs["hf_dino"], pooling="mean")
    assert not cls_model.info.has_text
    for image in images()[:3]:
        out = reference(**processor(images=image, return_tensors="pt"))
        cls = torch.nn.functional.normalize(out.pooler_output, dim=-1)
        mean = torch.nn.functional.normalize(out.last_hidden_state[:, 1:].mean(1), dim=-1)
        assert torch.allclose(
            cls_model.embed_images(cls_model.preprocess(image)[None]), cls, atol=1e-4
        )
        assert torch.allclose(
            mean_model.embed_images(mean_model.preprocess(image)[None]), mean, atol=1e-4
        )
    with pytest.raises(TypeError):
        cls_model.embed_texts(["no text tower"])


def test_scoring_follows_the_model_not_its_name(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    disguised = shutil.copytree(model_dirs["open_clip_siglip"], tmp_path / "clip-vit-b32-cosine")
    assert backend("open_clip_siglip", disguised).info.scoring == "sigmoid"
    plain = shutil.copytree(model_dirs["open_clip"], tmp_path / "siglip2-sigmoid")
    assert backend("open_clip", plain).info.scoring == "cosine"


@pytest.mark.parametrize("kind", ["open_clip", "open_clip_siglip", "hf_clip", "hf_siglip"])
def test_text_longer_than_the_context_is_truncated_not_an_error(
    model_dirs: dict[str, Path], kind: str
) -> None:
    model = backend(kind, model_dirs[kind])
    long_text = "an extremely detailed product description " * 300
    vectors = model.embed_texts([long_text, "short"])
    assert vectors.shape[0] == 2 and torch.isfinite(vectors).all()
    # Everything past the context changes nothing: the text was cut, not embedded whole.
    longer = model.embed_texts([long_text + " with a different ending entirely"])
    assert torch.allclose(vectors[0], longer[0], atol=1e-5)


@pytest.mark.parametrize(
    "kind", ["open_clip", "open_clip_siglip", "hf_clip", "hf_siglip", "hf_dino"]
)
def test_scores_are_the_same_alone_and_in_a_batch_of_32(
    model_dirs: dict[str, Path], kind: str
) -> None:
    model = backend(kind, model_dirs[kind])
    pictures = [images()[i % len(COLOURS)] for i in range(32)]
    pixels = [model.preprocess(p) for p in pictures]
    alone = torch.cat([model.embed_images(p[None]) for p in pixels])
    together = model.embed_images(torch.stack(pixels))
    assert torch.allclose(alone, together, atol=1e-4)
    if model.info.has_text:
        texts = [f"{c} thing number {i}" for i, c in enumerate(COLOURS * 4)]
        text_alone = torch.cat([model.embed_texts([t]) for t in texts])
        assert torch.allclose(text_alone, model.embed_texts(texts), atol=1e-4)


def test_batched_service_returns_each_request_its_own_embeddings(
    model_dirs: dict[str, Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = backend("open_clip", model_dirs["open_clip"])
    # A wait long enough that all 32 threads submit within it even on a loaded machine; the
    # batch of 64 images then fills and runs at once.
    service = InferenceService(model, max_size=64, max_wait_s=3.0, input_path="pil")
    requests = [
        EmbedRequest((model.preprocess(images()[i % 8]),) * (1 + i % 3), (f"text {i}",))
        for i in range(32)
    ]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda r: service.embed(r, timeout=30), requests))
    service.close()
    assert service.calls.image_calls < 8  # 32 requests, 64 images: shared calls
    for request, result in zip(requests, results, strict=True):
        direct_images = model.embed_images(torch.stack(request.pixels))
        assert torch.allclose(result.image_embeddings, direct_images, atol=1e-4)
        assert torch.allclose(
            result.text_embeddings, model.embed_texts(list(request.texts)), atol=1e-4
        )


def test_an_image_shared_by_listings_in_one_batch_is_embedded_once(
    model_dirs: dict[str, Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = backend("open_clip", model_dirs["open_clip"])
    service = InferenceService(model, max_size=64, max_wait_s=0.5, input_path="pil")
    shared, other = (model.preprocess(images()[i]) for i in (0, 1))
    requests = [
        EmbedRequest((shared,), ("variant small",), ("sha-shared",)),
        EmbedRequest((shared, other), ("variant large",), ("sha-shared", "sha-other")),
        EmbedRequest((shared,), ("variant medium",), ("sha-shared",)),
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda r: service.embed(r, timeout=30), requests))
    service.close()
    assert service.calls.images == 2
    expected = model.embed_images(torch.stack([shared, other]))
    assert torch.allclose(results[0].image_embeddings[0], expected[0], atol=1e-4)
    assert torch.allclose(results[1].image_embeddings, expected, atol=1e-4)
    assert torch.allclose(results[2].image_embeddings[0], expected[0], atol=1e-4)
