"""The pure parts of `train`: losses checked by hand, the validation split, the registry entry
and the precision choice."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from contract.registry import ModelSpec, get_spec, load_registry
from listing_vision.training.amp import choose_precision
from listing_vision.training.data import Example, check_usable, split_validation
from listing_vision.training.entry import finetuned_spec, registry_entry
from listing_vision.training.errors import TrainingError
from listing_vision.training.losses import best_image_cosine, binary_loss, contrastive_loss

CPU = torch.device("cpu")


def test_clip_loss_of_two_orthogonal_pairs_by_hand() -> None:
    eye = torch.eye(2)
    # Each row's softmax: e^1 / (e^1 + e^0); both directions alike.
    loss = contrastive_loss(eye, eye, torch.tensor(1.0), None)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)))


def test_siglip_loss_of_two_orthogonal_pairs_by_hand() -> None:
    eye = torch.eye(2)
    # Two positives at logit 1, two negatives at logit 0, summed and divided by the batch (2).
    loss = contrastive_loss(eye, eye, torch.tensor(1.0), torch.tensor(0.0))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2))


def test_a_listing_is_as_close_to_its_text_as_its_best_image() -> None:
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    cosines = best_image_cosine(images, texts, torch.tensor([0, 0, 1]))
    assert cosines.tolist() == pytest.approx([1.0, 0.0])


def test_binary_loss_on_the_scaled_cosine_by_hand() -> None:
    # 2 * 0.5 - 1 = 0: probability one half either way.
    loss = binary_loss(
        torch.tensor([0.5, 0.5]), torch.tensor([False, True]), torch.tensor(2.0), torch.tensor(-1.0)
    )
    assert float(loss) == pytest.approx(math.log(2))
    confident = binary_loss(
        torch.tensor([0.9, 0.1]),
        torch.tensor([False, True]),
        torch.tensor(20.0),
        torch.tensor(-10.0),
    )
    assert float(confident) < 1e-3


def examples(count: int, per_image: int = 2) -> list[Example]:
    return [
        Example(f"f.csv:{n}", (Path(f"/img/{n // per_image}.png"),), f"text {n}", n % 2 == 1)
        for n in range(count)
    ]


def test_the_split_keeps_every_pair_of_an_image_on_one_side() -> None:
    data = examples(40)
    train, val = split_validation(data, 0.25, seed=3)
    assert len(val) == 10 and len(train) == 30
    assert {e.images for e in train}.isdisjoint({e.images for e in val})
    assert split_validation(data, 0.25, seed=3) == (train, val)  # seeded
    assert split_validation(data, 0.25, seed=4) != (train, val)


def test_data_without_both_labels_is_refused() -> None:
    only_matches = [replace(e, mismatch=False) for e in examples(4)]
    with pytest.raises(TrainingError, match="needs both matches and mismatches"):
        check_usable(only_matches, "validation")
    one_text = [replace(e, mismatch=None, text="same") for e in examples(4)]
    with pytest.raises(TrainingError, match="at least two with different texts"):
        check_usable(one_text, "training")


def test_the_registry_entry_reads_back_with_the_base_models_serving_settings(
    tmp_path: Path,
) -> None:
    base = ModelSpec(
        "base",
        "open_clip",
        "ViT-B-32",
        pretrained="openai",
        threshold=0.25,
        batch_max_size=32,
        prompt_templates=('a photo of "{}"',),
        precision="fp16",
    )
    out = tmp_path / 'odd "folder" \\ é'
    spec = finetuned_spec(base, "base-finetuned", f"local-dir:{out}", 0.123456789)
    path = tmp_path / "models.toml"
    path.write_text(registry_entry(spec))
    read = get_spec(load_registry(path), "base-finetuned")
    assert read == spec  # name, threshold, templates, precision, batching: all as written
    assert read.pretrained is None and read.threshold == 0.123456789


def test_precision_follows_the_device() -> None:
    assert choose_precision("auto", CPU).name == "fp32"
    assert choose_precision("auto", CPU).grad_scaler() is None
    fp16 = choose_precision("fp16", CPU)
    assert fp16.dtype == torch.float16 and fp16.grad_scaler() is not None
    assert choose_precision("bf16", CPU).grad_scaler() is None
    with pytest.raises(TrainingError, match="--precision 'fp8'"):
        choose_precision("fp8", CPU)
