"""Rebuild the bundled toy model `lv-toy`: `python -m listing_vision.demo.build_toy_model`.

A word-level tokenizer over the toy catalogue's words, a small CLIP-shaped open_clip config, then
`listing_vision.training` (the code behind `listing-vision train`) on drawn image/title pairs, and
a threshold calibrated on a separate validation catalogue. Seeded: the same inputs give the same
model. CPU, a few minutes.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from contract.registry import ModelSpec
from contract.settings import load_settings
from listing_vision.demo.catalogue import (
    COLOURS,
    PRODUCTS,
    TITLE_TEMPLATES,
    draw_product,
    make_catalogue,
    training_texts,
)
from listing_vision.training import TrainConfig, TrainRequest, train
from worker.categories import DEFAULT_TEMPLATES

TOY_DIR = Path(__file__).with_name("lv-toy")
IMAGE_SIZE = 64
CONTEXT = 24
PAIRS_PER_CLASS = 100
SPECIALS = ("[PAD]", "[UNK]", "[SOS]")  # [EOS] is added last: it has the highest id


def model_config(vocab_size: int, eos_id: int) -> dict[str, object]:
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "patch_size": 8,
                "width": 96,
                "layers": 4,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": CONTEXT,
                "vocab_size": vocab_size,
                "width": 96,
                "heads": 3,
                "layers": 3,
                "hf_tokenizer_name": "lv-toy",
                "pool_type": "eos",
                "eos_id": eos_id,
                "pad_id": 0,
            },
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }


def all_texts() -> list[str]:
    """Every text the toy will see: titles and the category prompt templates."""
    subjects = [p for p in PRODUCTS] + [f"{c} {p}" for c in COLOURS for p in PRODUCTS]
    texts = [
        t.format(colour=c, product=p) for t in TITLE_TEMPLATES for c in COLOURS for p in PRODUCTS
    ]
    texts += [t.format(s) for t in DEFAULT_TEMPLATES for s in subjects]
    return texts


def write_tokenizer(directory: Path) -> tuple[int, int]:
    """A lowercase word-level tokenizer saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    probe = pre_tokenizers.Whitespace()
    words = sorted({w for text in all_texts() for w, _ in probe.pre_tokenize_str(text.lower())})
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words, "[EOS]"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]",
        special_tokens=[("[SOS]", vocab["[SOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[SOS]",
        eos_token="[EOS]",
        model_max_length=CONTEXT,
    )
    fast.save_pretrained(directory)
    return len(vocab), vocab["[EOS]"]


def write_pairs(directory: Path, seed: int) -> list[tuple[Path, str]]:
    """Drawn training pairs, one per class per round (a CSV is written too, as `train` reads)."""
    rng = random.Random(seed)
    pairs = []
    for round_index in range(PAIRS_PER_CLASS):
        for colour in COLOURS:
            for product in PRODUCTS:
                path = directory / f"{round_index:03d}-{colour}-{product.replace(' ', '_')}.png"
                draw_product(colour, product, rng, IMAGE_SIZE).save(path)
                pairs.append((path, training_texts(colour, product, rng, DEFAULT_TEMPLATES)))
    with (directory / "pairs.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "text"])
        writer.writerows((path.name, text) for path, text in pairs)
    return pairs


def calibrate(model_dir: Path, scratch: Path) -> dict[str, float]:
    """The threshold that best separates matching from planted-mismatch titles (F1), measured
    on a validation catalogue drawn with another seed than training and the demo."""
    from worker.backends import create_backend

    backend = create_backend(ModelSpec("lv-toy", "open_clip", f"local-dir:{model_dir}"), "cpu")
    backend.load()
    listings = make_catalogue(scratch / "validation", 400, mismatch_rate=0.5, seed=1234)
    from worker.decode import decode_image

    pixels = torch.stack(
        [
            backend.preprocess(decode_image(x.image.read_bytes(), max_pixels=10**7).pixels)
            for x in listings
        ]
    )
    image_vectors = backend.embed_images(pixels)
    text_vectors = backend.embed_texts([x.title for x in listings])
    scores = (image_vectors * text_vectors).sum(-1).tolist()
    truth = [x.planted_mismatch for x in listings]
    best = max((_f1(scores, truth, t), t) for t in sorted(set(scores)))
    threshold = round(best[1] + 1e-4, 4)
    precision, recall = _precision_recall(scores, truth, threshold)
    return {"threshold": threshold, "validation_precision": precision, "validation_recall": recall}


def _precision_recall(
    scores: list[float], truth: list[bool], threshold: float
) -> tuple[float, float]:
    flagged = [s < threshold for s in scores]
    tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
    fp = sum(f and not t for f, t in zip(flagged, truth, strict=True))
    fn = sum(t and not f for f, t in zip(flagged, truth, strict=True))
    return tp / max(1, tp + fp), tp / max(1, tp + fn)


def _f1(scores: list[float], truth: list[bool], threshold: float) -> float:
    precision, recall = _precision_recall(scores, truth, threshold + 1e-4)
    return 2 * precision * recall / max(1e-9, precision + recall)


def main() -> None:
    """`build_toy_model [EPOCHS] [OUT]`: OUT defaults to the bundled folder."""
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else TOY_DIR
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        start = scratch / "init"
        start.mkdir()
        vocab_size, eos_id = write_tokenizer(start)
        (start / "open_clip_config.json").write_text(
            json.dumps(model_config(vocab_size, eos_id), indent=2)
        )
        data = scratch / "pairs"
        data.mkdir()
        write_pairs(data, seed=0)
        spec = ModelSpec("lv-toy", "open_clip", f"local-dir:{start}")
        config = TrainConfig(
            epochs=epochs,
            batch_size=64,
            lr=1e-3,
            weight_decay=0.05,
            patience=epochs,  # every epoch runs; the best by validation loss is kept
            seed=0,
            half=True,
        )
        request = TrainRequest(
            spec, data / "pairs.csv", scratch / "trained", val_split=0.05, config=config
        )
        report = train(load_settings(), request)
        target.mkdir(parents=True, exist_ok=True)
        for item in report.out_dir.iterdir():  # the model, not its checkpoints and record
            if item.is_file() and item.name != "training.json":
                shutil.copy2(item, target / item.name)
        calibration = calibrate(target, scratch)
    (target / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    print(f"trained {report.fit.steps} steps, kept epoch {report.fit.best.epoch}")
    print(f"calibration: {calibration}")


if __name__ == "__main__":
    main()
