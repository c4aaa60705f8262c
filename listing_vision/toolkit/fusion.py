"""Reciprocal rank fusion (Cormack, Clarke and Büttcher, 2009): several rankings of the same
items become one, each item scoring the sum of 1 / (k + rank) over the rankings that hold it.
It needs no common scale, which is why it can fuse models whose similarities are not
comparable (a CLIP's cosines, a DINOv2's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RRF_K = 60  # the paper's constant: damps the weight of the very first ranks


@dataclass(frozen=True)
class Fused:
    """An item's fused score and its rank (1-based) in each ranking that holds it."""

    item: str
    score: float
    ranks: dict[str, int]


def reciprocal_rank_fusion(rankings: Mapping[str, Sequence[str]], k: int = RRF_K) -> list[Fused]:
    """Items of every ranking (named), best fused score first; ties by item, for stability."""
    ranks: dict[str, dict[str, int]] = {}
    for name, ranking in rankings.items():
        for position, item in enumerate(ranking, start=1):
            ranks.setdefault(item, {}).setdefault(name, position)
    fused = [
        Fused(item, sum(1.0 / (k + rank) for rank in held.values()), held)
        for item, held in ranks.items()
    ]
    return sorted(fused, key=lambda f: (-f.score, f.item))
