"""How training fails: the user's input (exit 2) or the optimisation itself (exit 1)."""

from __future__ import annotations


class TrainingError(ValueError):
    """The training data, the options or the base model cannot be used; the message says which
    file, line or option."""


class Diverged(RuntimeError):
    """The loss or a gradient became non-finite: training stopped, and no model was kept."""
