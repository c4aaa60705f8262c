"""The bundled toy model: small, loadable through the registry, calibrated as the registry says."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from contract.registry import get_spec, load_registry
from listing_vision.demo.build_toy_model import TOY_DIR
from listing_vision.demo.catalogue import COLOURS, PRODUCTS, draw_product, make_catalogue
from worker.backends import create_backend
from worker.decode import decode_image
from worker.scoring import image_text_similarity


def test_toy_model_is_a_few_megabytes() -> None:
    size = sum(path.stat().st_size for path in TOY_DIR.iterdir())
    assert 0 < size < 5_000_000


def test_registry_threshold_is_the_calibrated_one() -> None:
    calibration = json.loads((TOY_DIR / "calibration.json").read_text())
    spec = get_spec(load_registry(), "lv-toy")
    assert spec.threshold == calibration["threshold"]


def test_the_registry_threshold_separates_planted_mismatches_on_an_unseen_catalogue(
    tmp_path: Path,
) -> None:
    """Recomputed, not read from calibration.json (issue 14's mutation probe): a catalogue
    drawn with a seed neither training nor calibration used, scored through the registry's
    entry, flagged below its threshold."""
    spec = get_spec(load_registry(), "lv-toy")
    assert spec.threshold is not None
    backend = create_backend(spec, "cpu")
    backend.load()
    listings = make_catalogue(tmp_path, 200, mismatch_rate=0.5, seed=4321)
    pixels = torch.stack(
        [
            backend.preprocess(decode_image(x.image.read_bytes(), max_pixels=10**7).pixels)
            for x in listings
        ]
    )
    scores = backend.embed_images(pixels) * backend.embed_texts([x.title for x in listings])
    flagged = [score < spec.threshold for score in scores.sum(-1).tolist()]
    planted = [x.planted_mismatch for x in listings]
    caught = sum(f and p for f, p in zip(flagged, planted, strict=True))
    assert sum(planted) > 50  # both kinds are well represented
    assert caught / sum(flagged) >= 0.9  # precision
    assert caught / sum(planted) >= 0.9  # recall


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
