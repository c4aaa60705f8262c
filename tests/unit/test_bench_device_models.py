"""bench/device_models.py: the real models a CUDA host's `make bench` measures load through the
registry as written, DINOv2-large's processor takes the tensor input path, and each model is
judged by its own target."""

from __future__ import annotations

from pathlib import Path

from bench.device_models import DEVICE_MODELS, device_checks, dinov2_processor, registry_text
from contract.registry import load_registry
from worker.tensor_input import input_spec_from_hf


def test_the_open_clip_entries_load_with_random_weights_and_their_batch(tmp_path: Path) -> None:
    ids = ["gpu-vit-b32", "gpu-vit-l14", "gpu-vit-h14-378"]
    models_file = tmp_path / "models.toml"
    models_file.write_text(registry_text(tmp_path, ids))

    registry = load_registry(models_file)

    for model_id in ids:
        spec = registry[model_id]
        assert spec.backend == "open_clip"
        assert spec.name == DEVICE_MODELS[model_id].name
        assert spec.pretrained is None  # random weights: no model hub
        assert spec.batch_max_size == DEVICE_MODELS[model_id].batch
        assert spec.precision == "auto"  # bf16 on a GPU that has it


def test_dinov2_large_preprocessing_is_the_released_one_on_the_tensor_path() -> None:
    spec = input_spec_from_hf(dinov2_processor())

    assert spec is not None  # batched on the device, as on a GPU host
    assert spec.resize_mode == "shortest_edge" and spec.size == (256, 256)
    assert spec.crop == (224, 224)
    assert spec.interpolation == "bicubic"
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.229, 0.224, 0.225)


def test_each_model_is_judged_by_its_own_target() -> None:
    rows = [
        {"model": "gpu-vit-b32", "listings_per_s": 4_200.0, "ratio_to_model_only": 0.3},
        {"model": "gpu-vit-l14", "listings_per_s": 2_500.0, "ratio_to_model_only": 0.95},
        {"model": "gpu-vit-h14-378", "error": "OutOfMemoryError: ..."},  # recorded, not judged
    ]

    checks = device_checks(rows)

    assert checks == {
        "gpu_vit_b32_listings_per_s": (4_200.0, ">=", 5_000),
        "gpu_vit_l14_vs_model": (0.95, ">=", 0.9),
    }
