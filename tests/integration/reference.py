"""open_clip's own computation of what the worker should store, for comparison."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from worker.categories import DEFAULT_TEMPLATES, read_categories


@dataclass
class OpenClipReference:
    model: Any
    preprocess: Any
    tokenizer: Any

    @classmethod
    def load(cls, model_dir: Path) -> OpenClipReference:
        name = f"local-dir:{model_dir}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return cls(model.eval(), preprocess, open_clip.get_tokenizer(name))

    @torch.no_grad()
    def image(self, path: Path) -> torch.Tensor:
        pixels = self.preprocess(Image.open(path).convert("RGB"))[None]
        return self.model.encode_image(pixels, normalize=True)[0]

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts), normalize=True)

    def similarity(self, path: Path, text: str) -> float:
        cosine = float(self.image(path) @ self.texts([text])[0])
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:
            return cosine
        return float(torch.sigmoid(torch.tensor(cosine) * self.model.logit_scale.exp() + bias))

    def categories(self, path: Path, claim: str | None = None) -> list[tuple[str, float]]:
        labels = list(read_categories(None))
        if claim and claim not in labels:
            labels.append(claim)
        prompts = [t.format(label) for label in labels for t in DEFAULT_TEMPLATES]
        per_prompt = self.texts(prompts).reshape(len(labels), len(DEFAULT_TEMPLATES), -1)
        label_vectors = torch.nn.functional.normalize(per_prompt.mean(1), dim=-1)
        scale = float(self.model.logit_scale.exp().detach())
        probabilities = torch.softmax(label_vectors @ self.image(path) * scale, dim=0)
        order = torch.argsort(probabilities, descending=True)
        return [(labels[i], float(probabilities[i])) for i in order]
