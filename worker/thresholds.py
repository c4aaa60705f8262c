"""The thresholds a worker judges by: those `calibrate` recorded, over the registry's.

Read from the database at most every `max_age` seconds by whichever job finds them stale (the
others keep judging by the table they have), and at the start of every run chunk, so a
rescoring run started after a calibration applies it to every listing. A failed read keeps the
last table: a database hiccup must not turn verdicts back to the registry's threshold.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from contract.errors import one_line
from contract.thresholds import Thresholds
from db.thresholds import recorded_thresholds

log = logging.getLogger(__name__)
MAX_AGE_S = 10.0  # how stale a single job's thresholds may be after a calibration


class RecordedThresholds:
    """A `ThresholdSource` over the `thresholds` table for one model."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        model_id: str,
        registry_threshold: float | None,
        max_age: float = MAX_AGE_S,
    ) -> None:
        self._sessions = sessions
        self._model_id = model_id
        self._registry = registry_threshold
        self._max_age = max_age
        self._table = Thresholds(registry_threshold)
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> Thresholds:
        """The table, read again first when it is older than `max_age` (by one caller only)."""
        if time.monotonic() - self._read_at > self._max_age and self._lock.acquire(blocking=False):
            try:
                self._read()
            except Exception as error:
                self._read_at = time.monotonic()  # try again after another max_age
                log.warning("thresholds of %s not re-read: %s", self._model_id, one_line(error))
            finally:
                self._lock.release()
        return self._table

    def refresh(self) -> None:
        """Read the table now; a failure is raised (the caller retries its work)."""
        with self._lock:
            self._read()

    def _read(self) -> None:
        with self._sessions() as session:
            recorded = recorded_thresholds(session, self._model_id)
        table = Thresholds.from_recorded(self._registry, recorded)
        if table != self._table:
            log.info("%s judges by thresholds %s", self._model_id, table)
        self._table = table
        self._read_at = time.monotonic()
