"""Fine-tune (or train) an open_clip model on image/text pairs; write a `local-dir:` model.

The contrastive loss follows the model: CLIP's softmax loss, or SigLIP's sigmoid loss when the
model has a `logit_bias`. The output folder loads through the registry like any other model.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from contract.registry import ModelSpec
from worker.decode import decode_image

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"


class TrainingError(ValueError):
    """The pairs file or the base model cannot be used for training."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    seed: int = 0
    half: bool = False  # store weights in fp16 (half the size; loads into fp32 fine)


@dataclass(frozen=True)
class TrainReport:
    out_dir: Path
    steps: int
    first_loss: float
    last_loss: float


Pair = tuple[Path, str]


def read_pairs(csv_path: Path) -> list[Pair]:
    """`image,text` rows; image paths are relative to the CSV's folder unless absolute."""
    pairs = []
    with csv_path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not reader.fieldnames or not {"image", "text"} <= set(reader.fieldnames):
            raise TrainingError(f"{csv_path}: the header must name the columns image and text")
        for line, row in enumerate(reader, start=2):
            image, text = (row.get("image") or "").strip(), (row.get("text") or "").strip()
            if not image or not text:
                raise TrainingError(f"{csv_path}:{line}: image and text are both required")
            path = Path(image) if Path(image).is_absolute() else csv_path.parent / image
            if not path.is_file():
                raise TrainingError(f"{csv_path}:{line}: no such image {path}")
            pairs.append((path, text))
    if len(pairs) < 2:
        raise TrainingError(f"{csv_path}: at least two pairs are needed for a contrastive loss")
    return pairs


def train_open_clip(
    spec: ModelSpec,
    pairs: Sequence[Pair],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = print,
) -> TrainReport:
    """Train `spec`'s model on `pairs` and write it to `out_dir` as a `local-dir:` model."""
    import open_clip

    if spec.backend != "open_clip" or spec.name.startswith("hf-hub:"):
        raise TrainingError(
            "train fine-tunes open_clip models named by a built-in name (with a tag or "
            "checkpoint) or by local-dir:; download hf-hub: models to a folder first"
        )
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(
        spec.name, pretrained=spec.pretrained
    )
    tokenizer = open_clip.get_tokenizer(spec.name)
    sigmoid = getattr(model, "logit_bias", None) is not None
    loss_fn = open_clip.SigLipLoss() if sigmoid else open_clip.ClipLoss()
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = _warmup_cosine(optimizer, total, max(1, int(total * config.warmup_fraction)))
    images = {path: _load_image(path) for path in {path for path, _ in pairs}}
    losses: list[float] = []
    model.train()
    for epoch in range(config.epochs):
        order = list(pairs)
        random.shuffle(order)
        epoch_losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            if len(batch) < 2:
                continue
            pixels = torch.stack([preprocess_train(images[path]) for path, _ in batch])
            tokens = tokenizer([text for _, text in batch])
            outputs = model(pixels, tokens)
            loss = loss_fn(*outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss.item())
        losses += epoch_losses
        log(f"epoch {epoch + 1}/{config.epochs}: loss {sum(epoch_losses) / len(epoch_losses):.4f}")
    save_local_dir(model.eval(), spec, out_dir, half=config.half)
    return TrainReport(
        out_dir, len(losses), losses[0], sum(losses[-steps_per_epoch:]) / steps_per_epoch
    )


def save_local_dir(model: Any, spec: ModelSpec, out_dir: Path, *, half: bool = False) -> None:
    """Weights plus everything the base model's folder holds (config, tokenizer files)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.name.startswith("local-dir:"):
        source = Path(spec.name.removeprefix("local-dir:"))
        for item in source.iterdir():
            if item.is_file() and item.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
                shutil.copy2(item, out_dir / item.name)
    else:
        _write_builtin_config(model, spec, out_dir)
    dtype = torch.float16 if half else torch.float32
    state = {
        key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(state, str(out_dir / WEIGHTS))


def _write_builtin_config(model: Any, spec: ModelSpec, out_dir: Path) -> None:
    import open_clip

    model_cfg = open_clip.get_model_config(spec.name)
    if model_cfg is None:
        raise TrainingError(f"open_clip has no built-in config named {spec.name}")
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    (out_dir / CONFIG).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess)}, indent=2)
    )


def _load_image(path: Path) -> Image.Image:
    return decode_image(path.read_bytes(), max_pixels=100_000_000).pixels


def _warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
