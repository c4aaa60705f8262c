"""The scoring math, on unit-length embeddings; pure functions, easy to check by hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.labels import normalise_label
from worker.backends.base import ModelInfo

TOP_CATEGORIES = 5
MISMATCH_RANK = 3  # a seller's category outside the top 3 is a category mismatch


def image_text_similarity(
    image_embeddings: torch.Tensor, text_embedding: torch.Tensor, info: ModelInfo
) -> torch.Tensor:
    """One score per image: cosine for CLIP-style models, sigmoid(cos*scale+bias) for SigLIP."""
    cosine = image_embeddings @ text_embedding
    if info.scoring == "sigmoid":
        return torch.sigmoid(cosine * info.logit_scale + info.logit_bias)
    return cosine


@dataclass(frozen=True)
class CategoryScore:
    label: str
    score: float


def rank_categories(
    image_embedding: torch.Tensor,
    label_embeddings: torch.Tensor,
    labels: tuple[str, ...],
    logit_scale: float,
) -> list[CategoryScore]:
    """All labels by zero-shot probability (softmax of scaled cosines), best first."""
    probabilities = torch.softmax(label_embeddings @ image_embedding * logit_scale, dim=0)
    order = torch.argsort(probabilities, descending=True).tolist()
    return [CategoryScore(labels[i], float(probabilities[i])) for i in order]


def category_mismatch(ranked: list[CategoryScore], claimed: str | None) -> bool | None:
    """True when the seller claimed a category that is not among the top 3; None without a claim."""
    if not claimed:
        return None
    top = {score.label for score in ranked[:MISMATCH_RANK]}
    return normalise_label(claimed) not in top
