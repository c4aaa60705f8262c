"""Zero-shot product categories: the label list, prompt templates, cached text embeddings."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from worker.scoring import (
    TOP_CATEGORIES,
    CategoryScore,
    category_mismatch,
    normalise_label,
    rank_categories,
)

DEFAULT_CATEGORIES_FILE = Path(__file__).with_name("default_categories.txt")

# An ensemble of a few templates, averaged, is more robust than any single prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a product photo of a {}.",
    "a photo of the {}, for sale online.",
    "a close-up photo of a {}.",
    "a {} on a white background.",
)

EmbedTexts = Callable[[list[str]], torch.Tensor]


def read_categories(path: Path | None) -> tuple[str, ...]:
    """The deployment's list (`LV_CATEGORIES_FILE`: one label per line, `#` comments), or the
    built-in one in the same format."""
    path = path or DEFAULT_CATEGORIES_FILE
    labels = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label = normalise_label(line.split("#", 1)[0])
        if label and label not in labels:
            labels.append(label)
    if len(labels) < 2:
        raise ValueError(f"LV_CATEGORIES_FILE {path} must list at least two categories")
    return tuple(labels)


@dataclass(frozen=True)
class CategoryVerdict:
    """One image's top categories (best first) and whether its seller's claim is outside the
    top 3 (None without a claim)."""

    top: list[CategoryScore]
    mismatch: bool | None


MAX_CACHED_CLAIMS = 4096  # seller claims outside the list whose embeddings are kept


class CategoryIndex:
    """Category text embeddings computed once at worker start. The top categories come from the
    list alone; a seller's claim outside the list is embedded on first sight (and cached) and
    ranked among the list only to judge that claim."""

    def __init__(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        embed_texts: EmbedTexts,
    ) -> None:
        self.labels = tuple(normalise_label(label) for label in labels)
        self.templates = tuple(templates) or DEFAULT_TEMPLATES
        self._embed_texts = embed_texts
        self._lock = threading.Lock()
        self.embeddings = self._embed_labels(self.labels)
        # Claims outside the list, most recently used last; bounded, since sellers may claim
        # anything (20,000 distinct claims would otherwise be 20,000 entries kept forever).
        self._extra: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_extra = MAX_CACHED_CLAIMS

    def judge(
        self, images: torch.Tensor, logit_scale: float, claims: Sequence[str | None]
    ) -> list[CategoryVerdict]:
        """For each image (a row of `images`): its top categories from the list, and whether
        its seller's claim falls outside the top 3, in one matrix product for all of them.

        A listed claim is judged on the list's ranking; a claim outside the list on the list
        ranked together with the claim (`with_claim`).
        """
        probabilities = torch.softmax(images @ self.embeddings.T * logit_scale, dim=1)
        k = min(TOP_CATEGORIES, len(self.labels))
        values, indices = probabilities.topk(k, dim=1)
        verdicts = []
        for row, (top_values, top_indices, claim) in enumerate(
            zip(values.tolist(), indices.tolist(), claims, strict=True)
        ):
            top = [
                CategoryScore(self.labels[i], value)
                for i, value in zip(top_indices, top_values, strict=True)
            ]
            verdicts.append(
                CategoryVerdict(top, self._mismatch(images[row], logit_scale, top, claim))
            )
        return verdicts

    def _mismatch(
        self,
        image: torch.Tensor,
        logit_scale: float,
        top: list[CategoryScore],
        claimed: str | None,
    ) -> bool | None:
        labels, embeddings = self.with_claim(claimed)
        if labels is self.labels:
            return category_mismatch(top, claimed)
        return category_mismatch(rank_categories(image, embeddings, labels, logit_scale), claimed)

    def with_claim(self, claimed: str | None) -> tuple[tuple[str, ...], torch.Tensor]:
        """Labels and embeddings to rank for one listing: the list, plus its claim if new."""
        claim = normalise_label(claimed) if claimed else ""
        if not claim or claim in self.labels:
            return self.labels, self.embeddings
        with self._lock:
            extra = self._extra.get(claim)
            if extra is not None:
                self._extra.move_to_end(claim)
        if extra is None:
            extra = self._embed_labels((claim,))
            with self._lock:
                self._extra[claim] = extra
                while len(self._extra) > self.max_extra:
                    self._extra.popitem(last=False)
        return (*self.labels, claim), torch.cat([self.embeddings, extra])

    def _embed_labels(self, labels: Sequence[str]) -> torch.Tensor:
        prompts = [template.format(label) for label in labels for template in self.templates]
        per_prompt = self._embed_texts(prompts).reshape(len(labels), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)
