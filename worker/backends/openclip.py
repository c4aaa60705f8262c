"""open_clip models: built-in names with a tag or checkpoint path, `hf-hub:` and `local-dir:`."""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from PIL import Image

from worker.backends.base import ModelBackend, ModelInfo, image_text_info
from worker.tensor_input import InputSpec, input_spec_from_open_clip

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "pure_bf16", torch.float16: "pure_fp16"}


class OpenClipBackend(ModelBackend):
    """CLIP-style (cosine) or SigLIP-style (sigmoid) open_clip model; decided by `logit_bias`."""

    def _load(self) -> ModelInfo:
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.spec.name,
            pretrained=self.spec.pretrained,
            precision=_PRECISION[self.dtype],
            device=self.device,
        )
        self.model: Any = model.eval()
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(self.spec.name)
        image_size = _image_size(model)
        probe = torch.zeros(1, 3, image_size, image_size, device=self.device, dtype=self.dtype)
        return image_text_info(
            self.model,
            embed_dim=int(self.model.encode_image(probe).shape[-1]),
            image_size=image_size,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def input_spec(self) -> InputSpec | None:
        return input_spec_from_open_clip(self._preprocess)

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        # open_clip's tokenizers truncate to the context length (keeping the end-of-text token).
        tokens = self._tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)


def _image_size(model: Any) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)
