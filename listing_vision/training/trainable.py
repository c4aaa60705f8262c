"""A registry model opened for training: its towers, transforms, tokenizer, and how it is saved
so that the registry's own backend (`worker.backends`) loads it back.

open_clip models are written as a `local-dir:` folder; transformers CLIP and SigLIP models with
`save_pretrained` (model and processor), named by their folder. Training keeps fp32 master
weights (mixed precision is autocast's job, `amp.py`).
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from contract.registry import Backend, ModelSpec
from listing_vision.training.errors import TrainingError

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TRAINABLE_BACKENDS = ("open_clip", "hf_clip", "hf_siglip")


class Trainable(ABC):
    """An image-text model in training: fp32 weights on `device`."""

    backend: Backend
    model: Any  # torch.nn.Module

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        """The learned temperature, as a log (scores use its exp)."""
        scale: torch.nn.Parameter = self.model.logit_scale
        return scale

    @property
    def logit_bias(self) -> torch.nn.Parameter | None:
        """SigLIP-style models have one, and are scored by a sigmoid (as the worker decides)."""
        return getattr(self.model, "logit_bias", None)

    @abstractmethod
    def train_transform(self, image: Image.Image) -> torch.Tensor:
        """An RGB image to model input for training (the library's augmentation, if any)."""

    @abstractmethod
    def eval_transform(self, image: Image.Image) -> torch.Tensor:
        """An RGB image to model input exactly as the worker's backend prepares it."""

    @abstractmethod
    def encode(
        self, pixels: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-length image and text embeddings (float32) for a batch on the device."""

    @abstractmethod
    def save(self, out_dir: Path, *, half: bool) -> None:
        """Write the model where the registry's backend can load it (fp16 weights if `half`)."""

    @abstractmethod
    def registry_name(self, out_dir: Path) -> str:
        """The registry `name` that loads what `save` wrote to `out_dir`."""


def load_trainable(spec: ModelSpec, device: torch.device) -> Trainable:
    """Open `spec`'s model for training; `TrainingError` for a backend or name we cannot save."""
    match spec.backend:
        case "open_clip":
            return OpenClipTrainable(spec, device)
        case "hf_clip" | "hf_siglip":
            return HfDualEncoderTrainable(spec, device)
        case _:
            raise TrainingError(
                f"{spec.model_id} is a {spec.backend} model; train fine-tunes image-text models "
                f"({', '.join(TRAINABLE_BACKENDS)})"
            )


class OpenClipTrainable(Trainable):
    """open_clip: a built-in name with a tag or checkpoint, or a `local-dir:` folder."""

    backend: Backend = "open_clip"

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        import open_clip

        super().__init__(spec, device)
        if spec.name.startswith("hf-hub:"):
            raise TrainingError(
                "train fine-tunes open_clip models named by a built-in name (with a tag or "
                "checkpoint) or by local-dir:; download hf-hub: models to a folder first"
            )
        self.model, self._train_transform, self._eval_transform = (
            open_clip.create_model_and_transforms(
                spec.name, pretrained=spec.pretrained, device=device
            )
        )
        self._tokenizer = open_clip.get_tokenizer(spec.name)

    def train_transform(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self._train_transform(image)
        return pixels

    def eval_transform(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self._eval_transform(image)
        return pixels

    def encode(
        self, pixels: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokenizer(list(texts)).to(self.device)
        images = self.model.encode_image(pixels)
        words = self.model.encode_text(tokens)
        return F.normalize(images.float(), dim=-1), F.normalize(words.float(), dim=-1)

    def save(self, out_dir: Path, *, half: bool) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        if self.spec.name.startswith("local-dir:"):
            # The config and tokenizer files travel with the weights.
            source = Path(self.spec.name.removeprefix("local-dir:"))
            for item in source.iterdir():
                if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES:
                    shutil.copy2(item, out_dir / item.name)
        else:
            self._write_builtin_config(out_dir)
        save_file(_weights(self.model, half), str(out_dir / OPEN_CLIP_WEIGHTS))

    def registry_name(self, out_dir: Path) -> str:
        return f"local-dir:{out_dir}"

    def _write_builtin_config(self, out_dir: Path) -> None:
        import open_clip

        model_cfg = open_clip.get_model_config(self.spec.name)
        if model_cfg is None:
            raise TrainingError(f"open_clip has no built-in config named {self.spec.name}")
        preprocess = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        config = {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess)}
        (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))


class HfDualEncoderTrainable(Trainable):
    """transformers CLIPModel or SiglipModel with its processor, from a folder or the HF cache.
    Texts are tokenised as the worker's backend does (SigLIP padded to its full context)."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        from transformers import AutoProcessor

        from worker.backends.hf_dual_encoder import HfClipBackend, HfSiglipBackend
        from worker.backends.hf_loading import load_pretrained

        super().__init__(spec, device)
        self.backend = spec.backend
        self._padding = (HfSiglipBackend if spec.backend == "hf_siglip" else HfClipBackend).padding
        self.model = load_pretrained(spec.name, torch.float32, device)
        self._processor: Any = AutoProcessor.from_pretrained(spec.name)
        self._context = int(self.model.config.text_config.max_position_embeddings)

    def train_transform(self, image: Image.Image) -> torch.Tensor:
        return self.eval_transform(image)  # transformers processors do not augment

    def eval_transform(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self._processor.image_processor(images=image, return_tensors="pt")[
            "pixel_values"
        ][0]
        return pixels

    def encode(
        self, pixels: torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from worker.backends.hf_loading import pooled

        tokens = self._processor(
            text=list(texts),
            padding=self._padding,
            truncation=True,
            max_length=self._context,
            return_tensors="pt",
        ).to(self.device)
        images = pooled(self.model.get_image_features(pixel_values=pixels))
        words = pooled(self.model.get_text_features(**tokens))
        return F.normalize(images.float(), dim=-1), F.normalize(words.float(), dim=-1)

    def save(self, out_dir: Path, *, half: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir, state_dict=_weights(self.model, half))
        self._processor.save_pretrained(out_dir)

    def registry_name(self, out_dir: Path) -> str:
        return str(out_dir)


def _weights(model: Any, half: bool) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, floating tensors in fp16 when `half` (the model untouched)."""
    dtype = torch.float16 if half else torch.float32
    return {
        key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in model.state_dict().items()
    }
