"""Category labels compare case- and space-insensitively: one rule for the worker's category
list, a seller's claim, a labelled listing's category and a calibrated threshold's key."""

from __future__ import annotations


def normalise_label(label: str) -> str:
    """ "Car  Tyre" is "car tyre"."""
    return " ".join(label.lower().split())
