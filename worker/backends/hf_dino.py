"""DINOv2 (transformers AutoModel): image embeddings only, for near-duplicates and search."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from worker.backends.base import ModelBackend, ModelInfo
from worker.backends.hf_loading import load_pretrained
from worker.tensor_input import InputSpec, input_spec_from_hf


class HfDinoBackend(ModelBackend):
    """CLS token after the final layer norm (`pooling = "cls"`), or the mean of patch tokens."""

    def _load(self) -> ModelInfo:
        from transformers import AutoImageProcessor

        self.model: Any = load_pretrained(self.spec.name, self.dtype, self.device)
        self.processor: Any = AutoImageProcessor.from_pretrained(self.spec.name)
        self.skip_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        crop = self.processor.crop_size or self.processor.size
        side = int(crop.get("height") or crop.get("shortest_edge"))
        probe = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
        embed_dim = int(self._embed_images(probe).shape[-1])
        return ModelInfo(
            embed_dim=embed_dim,
            has_text=False,
            scoring="cosine",
            logit_scale=1.0,
            logit_bias=0.0,
            image_size=side,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels

    def input_spec(self) -> InputSpec | None:
        return input_spec_from_hf(self.processor)

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixels)
        if self.spec.pooling == "mean":
            patches: torch.Tensor = output.last_hidden_state[:, self.skip_tokens :]
            return patches.mean(dim=1)
        cls: torch.Tensor = output.pooler_output
        return cls

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise TypeError("DINOv2 has no text encoder")
