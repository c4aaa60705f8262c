"""The thresholds a model's verdicts use: `is_match = similarity >= threshold`.

The registry gives each model one threshold; `listing-vision calibrate` records thresholds
derived from labelled listings (model-wide, and per claimed category where the labels allow),
which then win over the registry's. A listing is judged by the threshold of the category its
seller claims, else by the model-wide one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from contract.labels import normalise_label


@dataclass(frozen=True)
class Thresholds:
    """A model's thresholds: `default` (None: the model gives no verdict) and, per normalised
    claimed category, one of its own. A fixed table is also its own `ThresholdSource`."""

    default: float | None
    by_category: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_recorded(
        cls, registry_threshold: float | None, recorded: Mapping[str | None, float]
    ) -> Thresholds:
        """Recorded thresholds (key None: model-wide) over the registry's."""
        by_category = {normalise_label(k): v for k, v in recorded.items() if k is not None}
        return cls(recorded.get(None, registry_threshold), by_category)

    def for_category(self, claimed: str | None) -> float | None:
        """The threshold a listing claiming `claimed` is judged by."""
        if claimed and self.by_category:
            own = self.by_category.get(normalise_label(claimed))
            if own is not None:
                return own
        return self.default

    def is_match(self, similarity: float, claimed: str | None) -> bool | None:
        """The verdict (None without a threshold)."""
        threshold = self.for_category(claimed)
        return None if threshold is None else similarity >= threshold

    def current(self) -> Thresholds:
        return self

    def refresh(self) -> None:
        """Nothing to refresh: the table is fixed."""


class ThresholdSource(Protocol):
    """Where a warm scorer gets its thresholds: `current` may be a few seconds old, `refresh`
    reads them now (a rescoring run's chunk calls it first)."""

    def current(self) -> Thresholds: ...

    def refresh(self) -> None: ...
