"""How long to wait before trying a job again: one helper, used by every retry."""

from __future__ import annotations

import random

MAX_BACKOFF_SECONDS = 300.0


def backoff_seconds(attempt: int, base: float) -> float:
    """Exponential backoff with ±20% jitter, so a burst of failures does not retry in lockstep."""
    delay = min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1))
    return round(delay * random.uniform(0.8, 1.2), 3)
