"""transformers image-text models: CLIPModel (cosine) and SiglipModel (sigmoid).

Both tokenize through the saved processor, as the model cards do: CLIP pads to the longest text,
SigLIP to its full context (its text tower pools the last position, so padding changes scores).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from worker.backends.base import ModelBackend, ModelInfo, image_text_info
from worker.backends.hf_loading import load_pretrained, pooled
from worker.tensor_input import InputSpec, input_spec_from_hf


class _HfDualEncoder(ModelBackend):
    padding: str | bool = True

    def _load(self) -> ModelInfo:
        from transformers import AutoProcessor

        self.model: Any = load_pretrained(self.spec.name, self.dtype, self.device)
        self.processor: Any = AutoProcessor.from_pretrained(self.spec.name)
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        crop = self.processor.image_processor.crop_size or self.processor.image_processor.size
        probe = torch.zeros(
            1, 3, crop["height"], crop["width"], device=self.device, dtype=self.dtype
        )
        return image_text_info(
            self.model,
            embed_dim=int(self._embed_images(probe).shape[-1]),
            image_size=int(crop["height"]),
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self.processor.image_processor(images=image, return_tensors="pt")[
            "pixel_values"
        ][0]
        return pixels

    def input_spec(self) -> InputSpec | None:
        return input_spec_from_hf(self.processor.image_processor)

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(
            text=texts,
            padding=self.padding,
            truncation=True,  # an overlong listing text is cut to the context, never an error
            max_length=self.context_length,
            return_tensors="pt",
        ).to(self.device)
        return pooled(self.model.get_text_features(**tokens))


class HfClipBackend(_HfDualEncoder):
    """transformers CLIPModel + CLIPProcessor."""

    padding = True


class HfSiglipBackend(_HfDualEncoder):
    """transformers SiglipModel + SiglipProcessor; scores are sigmoid(cos*scale + bias)."""

    padding = "max_length"
