"""Re-sends work that no broker message will bring back: jobs, and the chunks of runs.

Ways work loses its message: the producer died (or the broker failed) between the commit and
the send; a retry could not be published; a worker died and its message vanished with an
un-persisted broker; the broker restarted empty. The database knows each case
(`db.jobs.jobs_to_resend`, `db.runs.chunks_to_resend`); one worker per model at a time (an
advisory lock) re-sends them. A run whose chunks stop finishing is noticed the same way: its
open chunks are sent again. A duplicate delivery is harmless: claims count deliveries and every
write is an idempotent, fenced upsert.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import jobs, runs
from db.locks import try_transaction_lock

log = logging.getLogger(__name__)
SendJobs = Callable[[Sequence[uuid.UUID]], None]
SendChunks = Callable[[Sequence[uuid.UUID], float | None], None]


@dataclass(frozen=True)
class Lateness:
    """How long work may wait before it counts as lost.

    unsent_for: never sent this long (the producer's send, a retry's publish).
    stuck_for: `running` this long (past any redelivery of a dead worker's message).
    stalled_for: a run that has not progressed this long has its queued chunks sent again.
    """

    unsent_for: timedelta
    stuck_for: timedelta
    stalled_for: timedelta


@dataclass
class Reconciler:
    sessions: sessionmaker[Session]
    send_jobs: SendJobs
    send_chunks: SendChunks
    model_id: str
    lateness: Lateness
    batch: int = 1000

    def run_once(self) -> int:
        """Re-send what is lost now; returns how many jobs and chunks were sent again."""
        with self.sessions.begin() as session:
            if not try_transaction_lock(session, f"lv-reconcile:{self.model_id}"):
                return 0
            lost_jobs = jobs.jobs_to_resend(
                session,
                self.model_id,
                unsent_for=self.lateness.unsent_for,
                stuck_for=self.lateness.stuck_for,
                limit=self.batch,
            )
            lost_chunks = runs.chunks_to_resend(
                session,
                self.model_id,
                unsent_for=self.lateness.unsent_for,
                stuck_for=self.lateness.stuck_for,
                stalled_for=self.lateness.stalled_for,
                limit=self.batch,
            )
            if lost_jobs:
                self.send_jobs(lost_jobs)
                jobs.mark_sent(session, lost_jobs)
            if lost_chunks:
                self.send_chunks(lost_chunks, None)
                runs.mark_chunks_sent(session, lost_chunks)
        if lost_jobs or lost_chunks:
            log.warning(
                "model %s: re-sent %d lost job(s) and %d run chunk(s)",
                self.model_id,
                len(lost_jobs),
                len(lost_chunks),
            )
        return len(lost_jobs) + len(lost_chunks)

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
