"""The two objectives, on unit-length embeddings (docs/training.md).

Contrastive pairs: each image's text against the batch's other texts, with the model's own loss:
CLIP's softmax cross-entropy both ways, or SigLIP's pairwise sigmoid loss when the model has a
`logit_bias`. Labelled pairs (seed practice): a binary cross-entropy on the scaled cosine of
each pair, `scale * cos + bias`, a listing's cosine being its best image's, as the worker scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Row i of `images` belongs with row i of `texts`; every other row is its negative."""
    logits = scale * images @ texts.T
    if bias is None:
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    signs = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(signs * (logits + bias)).sum() / len(logits)


def best_image_cosine(
    images: torch.Tensor, texts: torch.Tensor, owners: torch.Tensor
) -> torch.Tensor:
    """One cosine per text: the best of its images (`owners[i]` is image i's text)."""
    cosines = (images * texts[owners]).sum(-1)
    start = torch.full((len(texts),), float("-inf"), device=cosines.device, dtype=cosines.dtype)
    return start.scatter_reduce(0, owners, cosines, reduce="amax")


def binary_loss(
    cosines: torch.Tensor, mismatch: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy of `match` on `scale * cos + bias`."""
    return F.binary_cross_entropy_with_logits(scale * cosines + bias, (~mismatch).float())
