"""The bundled toy model: small, loadable through the registry, calibrated as the registry says."""

from __future__ import annotations

import json
import random

from contract.registry import get_spec, load_registry
from listing_vision.demo.build_toy_model import TOY_DIR
from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product
from worker.backends import create_backend
from worker.scoring import image_text_similarity


def test_toy_model_is_a_few_megabytes() -> None:
    size = sum(path.stat().st_size for path in TOY_DIR.iterdir())
    assert 0 < size < 5_000_000


def test_registry_threshold_is_the_calibrated_one() -> None:
    calibration = json.loads((TOY_DIR / "calibration.json").read_text())
    spec = get_spec(load_registry(), "lv-toy")
    assert spec.threshold == calibration["threshold"]
    assert calibration["validation_precision"] >= 0.9
    assert calibration["validation_recall"] >= 0.9


def test_toy_model_prefers_the_true_title_of_unseen_drawings() -> None:
    backend = create_backend(get_spec(load_registry(), "lv-toy"), "cpu")
    info = backend.load()
    rng = random.Random(555)
    right = 0
    for colour in COLOURS:
        for product in PRODUCTS:
            image = backend.embed_images(
                backend.preprocess(draw_product(colour, product, rng, 128))[None]
            )
            other_colour = rng.choice([c for c in COLOURS if c != colour])
            other_product = rng.choice([p for p in PRODUCTS if p != product])
            texts = [
                f"{colour} {product}",
                f"{other_colour} {product}",
                f"{colour} {other_product}",
            ]
            scores = image_text_similarity(image, backend.embed_texts(texts).T, info)[0]
            right += int(scores.argmax()) == 0
    assert right >= 0.9 * len(COLOURS) * len(PRODUCTS)
