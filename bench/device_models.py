"""The real models of the throughput issue's H100 targets, measured on a CUDA host by the same
`make bench` with no new code: ViT-B-32, ViT-L-14 and ViT-H-14-378 (open_clip) and DINOv2-large
(transformers), with random weights (no model hub here; speed does not depend on the values)
at the backends' own precision (`auto`: bf16 on a GPU that has it), each through a real worker
on the GPU host's input path (JPEGs decoded by nvJPEG, resized and normalised on the device).

Targets: the pipeline at least 0.9 of the model alone (an image call and, for a model with
text, a text call per batch: what a listing needs from the device) for ViT-L-14, ViT-H-14-378
and DINOv2-large, and at least 5,000 listings/s for ViT-B-32. Without CUDA this part is
skipped; `--device-models ID ...` runs named ones anyway, to check the path on a CPU (slowly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DINOV2_DIR = "dinov2-large-random"  # under the bench's scratch directory


@dataclass(frozen=True)
class DeviceModel:
    """One measured model: how it loads, its batch, how many listings a full run sends, and
    its target (a ratio to the model alone, or listings/s)."""

    backend: str
    name: str
    batch: int
    listings: int  # a few seconds at the H100 figure, so the start weighs little
    ratio_target: float | None = None
    rate_target: float | None = None


DEVICE_MODELS: dict[str, DeviceModel] = {
    "gpu-vit-b32": DeviceModel("open_clip", "ViT-B-32", 256, 20_480, rate_target=5_000),
    "gpu-vit-l14": DeviceModel("open_clip", "ViT-L-14", 256, 10_240, ratio_target=0.9),
    "gpu-vit-h14-378": DeviceModel(
        "open_clip", "ViT-H-14-378-quickgelu", 128, 2_048, ratio_target=0.9
    ),
    "gpu-dinov2-large": DeviceModel("hf_dino", DINOV2_DIR, 256, 10_240, ratio_target=0.9),
}


def registry_text(scratch: Path, model_ids: list[str]) -> str:
    """Registry entries for `model_ids` (the open_clip ones with no `pretrained`: random
    weights); DINOv2-large is saved under `scratch` first, as a local transformers model."""
    entries = []
    for model_id in model_ids:
        model = DEVICE_MODELS[model_id]
        name = model.name
        if model.backend == "hf_dino":
            name = str(save_random_dinov2_large(scratch / DINOV2_DIR))
        entries.append(
            f'\n[models.{model_id}]\nbackend = "{model.backend}"\nname = "{name}"\n'
            f"threshold = 0.25\nbatch_max_size = {model.batch}\n"
        )
    return "".join(entries)


def dinov2_processor() -> Any:
    """facebook/dinov2-large's image processor as it ships, built here (no model hub)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def save_random_dinov2_large(directory: Path) -> Path:
    """A DINOv2-large with random weights and the released processor, saved for
    `from_pretrained` (once per directory)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(  # facebook/dinov2-large's
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
    )
    Dinov2Model(config).save_pretrained(directory)
    dinov2_processor().save_pretrained(directory)
    return directory


def device_checks(rows: list[dict[str, Any]]) -> dict[str, tuple[float, str, float]]:
    """Each measured model's judged value: name -> (value, comparison, target)."""
    checks = {}
    for row in rows:
        if "error" in row:  # it failed before it was measured: nothing to judge
            continue
        model = DEVICE_MODELS[row["model"]]
        key = row["model"].replace("-", "_")
        if model.ratio_target is not None:
            checks[f"{key}_vs_model"] = (row["ratio_to_model_only"], ">=", model.ratio_target)
        if model.rate_target is not None:
            checks[f"{key}_listings_per_s"] = (row["listings_per_s"], ">=", model.rate_target)
    return checks
