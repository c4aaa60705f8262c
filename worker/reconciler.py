"""Re-sends work that no broker message will bring back: jobs, and the chunks of runs.

Ways work loses its message: the producer died (or the broker failed) between the commit and
the send; a retry could not be published; a worker died and its message vanished with an
un-persisted broker; the broker restarted empty. The database knows each case
(`db.jobs.jobs_to_resend`, `db.runs.chunks_to_resend`); one worker per model at a time (an
advisory lock) picks them. A run whose chunks stop finishing is noticed the same way: its
open chunks are sent again. A duplicate delivery is harmless: claims count deliveries and every
write is an idempotent, fenced upsert.

No row stays locked while the broker is asked anything (the review's M3): a pass takes lost
work in batches, each marked sent in a short transaction of its own and published only after
that commit. Claims, group commits and the producer's own `mark_sent` never queue behind a
slow (or silent) broker, however large the backlog. A publish that fails marks its batch
unsent again; a worker that dies between the commit and the publish leaves its batch marked
sent, and the "sent long ago, never claimed" rule sends it once more later.
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
    """`batch`: jobs (and chunks) marked and published per transaction; `max_batches`: how
    many batches one pass takes at most (the rest waits for the next pass)."""

    sessions: sessionmaker[Session]
    send_jobs: SendJobs
    send_chunks: SendChunks
    model_id: str
    lateness: Lateness
    batch: int = 200
    max_batches: int = 50

    def run_once(self) -> int:
        """Re-send what is lost now; returns how many jobs and chunks were sent again."""
        sent_jobs = sent_chunks = 0
        for _ in range(self.max_batches):
            taken = self._take()
            if taken is None:
                break
            lost_jobs, lost_chunks = taken
            self._publish(lost_jobs, lost_chunks)
            sent_jobs += len(lost_jobs)
            sent_chunks += len(lost_chunks)
            if len(lost_jobs) < self.batch and len(lost_chunks) < self.batch:
                break
        if sent_jobs or sent_chunks:
            log.warning(
                "model %s: re-sent %d lost job(s) and %d run chunk(s)",
                self.model_id,
                sent_jobs,
                sent_chunks,
            )
        return sent_jobs + sent_chunks

    def _take(self) -> tuple[list[uuid.UUID], list[uuid.UUID]] | None:
        """One batch of lost jobs and chunks, marked sent and committed; None when another
        reconciler of this model is at work or nothing is lost."""
        with self.sessions.begin() as session:
            if not try_transaction_lock(session, f"lv-reconcile:{self.model_id}"):
                return None
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
            jobs.mark_sent(session, lost_jobs)
            runs.mark_chunks_sent(session, lost_chunks)
        if not lost_jobs and not lost_chunks:
            return None
        return lost_jobs, lost_chunks

    def _publish(self, lost_jobs: list[uuid.UUID], lost_chunks: list[uuid.UUID]) -> None:
        """Publish one batch, outside any transaction; on failure it is unsent again."""
        try:
            if lost_jobs:
                self.send_jobs(lost_jobs)
        except Exception:
            with self.sessions.begin() as session:
                jobs.unmark_sent(session, lost_jobs)
                runs.unmark_chunks_sent(session, lost_chunks)
            raise
        try:
            if lost_chunks:
                self.send_chunks(lost_chunks, None)
        except Exception:
            with self.sessions.begin() as session:
                runs.unmark_chunks_sent(session, lost_chunks)
            raise

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
