"""Re-sends jobs that no broker message will bring back.

Three ways a job can lose its message: the producer died (or the broker failed) between the
commit and the send; a retry could not be published; a worker died and its message vanished
with an un-persisted broker. The database knows each case (`db.jobs.jobs_to_resend`); one worker
per model at a time (an advisory lock) re-sends them. A duplicate delivery is harmless: claims
count attempts and every write is an idempotent, fenced upsert.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import jobs
from db.locks import try_transaction_lock

log = logging.getLogger(__name__)
SendJobs = Callable[[Sequence[uuid.UUID]], None]


@dataclass
class Reconciler:
    sessions: sessionmaker[Session]
    send: SendJobs
    model_id: str
    unsent_for: timedelta
    stuck_for: timedelta
    batch: int = 1000

    def run_once(self) -> int:
        """Re-send what is lost now; returns how many jobs were sent again."""
        with self.sessions.begin() as session:
            if not try_transaction_lock(session, f"lv-reconcile:{self.model_id}"):
                return 0
            lost = jobs.jobs_to_resend(
                session,
                self.model_id,
                unsent_for=self.unsent_for,
                stuck_for=self.stuck_for,
                limit=self.batch,
            )
            if lost:
                self.send(lost)
                jobs.mark_sent(session, lost)
        if lost:
            log.warning("re-sent %d lost job(s) of model %s", len(lost), self.model_id)
        return len(lost)

    def start(self, interval: float) -> threading.Event:
        """Run every `interval` seconds in a daemon thread; set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.run_once()
                except Exception:
                    log.exception("reconciler pass failed; trying again in %.0fs", interval)

        threading.Thread(target=loop, name="reconciler", daemon=True).start()
        return stop
