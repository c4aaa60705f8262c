"""Group commit: finished jobs that arrive together are written in one transaction.

Per-listing commits cost a WAL flush and a turn at the change_seq lock each; under load they were
most of a worker's time. Task threads hand their outcome to a `DynamicBatcher` whose thread
writes everything waiting in one transaction; each task returns (and Celery acknowledges its
job) only after the commit that holds its rows. A transaction that fails is split in halves
like any batch, so one bad outcome fails alone; a database outage fails the group at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.orm import Session, sessionmaker

from db.records import JobOutcome
from db.results import record_outcomes
from worker.batching import DynamicBatcher
from worker.mirror import NO_MIRROR, MirrorHook
from worker.shared_queries import is_outage

_MAX_GROUP = 256
# No wait for company: a group's outcomes are queued together, and those queued during a commit
# go in the next one, so under load commits fill up anyway (single messages, 3 pairs: the same
# to 7 % more listings/s); waiting only held a lone job's commit back (2 ms on an idle worker).
_MAX_WAIT = 0.0
_LANES = 2  # transactions at once (see OutcomeWriter)


class OutcomeWriter:
    """Thread-safe: `write` blocks until the outcome is committed (or raises the error).

    `lanes` transactions run at once, each on its own connection (a delivery goes to the lane
    with the fewest outcomes pending): one transaction of a batch's rows, most of it
    PostgreSQL's HNSW inserts, took about half of a simulated ViT-H batch's device time, and
    a fast model's batches come several times faster; PostgreSQL runs them on separate cores.
    Concurrent writers were already safe (several worker processes share a model): every
    writer takes its rows in one fixed order, and each job is fenced by its attempt."""

    def __init__(
        self, sessions: sessionmaker[Session], mirror: MirrorHook = NO_MIRROR, lanes: int = _LANES
    ) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._lanes: list[DynamicBatcher[JobOutcome, bool]] = [
            DynamicBatcher(
                self._write,
                max_size=_MAX_GROUP,
                max_wait=_MAX_WAIT,
                name="outcome-writer",
                splits_on=lambda error: not is_outage(error),
            )
            for _ in range(max(1, lanes))
        ]
        self._pending = [0] * len(self._lanes)
        self._pending_lock = threading.Lock()

    def _submit(self, outcomes: Sequence[JobOutcome]) -> list[Future[bool]]:
        """A delivery's outcomes, all on the lane with the fewest pending (they commit
        together when they arrive together)."""
        with self._pending_lock:
            lane = min(range(len(self._lanes)), key=self._pending.__getitem__)
            self._pending[lane] += len(outcomes)
        futures = [self._lanes[lane].submit(outcome) for outcome in outcomes]
        for future in futures:
            future.add_done_callback(lambda _done: self._settled(lane))
        return futures

    def _settled(self, lane: int) -> None:
        with self._pending_lock:
            self._pending[lane] -= 1

    def write(self, outcome: JobOutcome, timeout: float) -> bool:
        """Commit `outcome`; False when its attempt no longer held the job (nothing written)."""
        (future,) = self._submit([outcome])
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            # Not yet taken by a group: it never will be (the job is retried instead). Already
            # in a running group, it may still commit: the retry's claim is fenced by attempt.
            future.cancel()
            raise

    def write_many(self, outcomes: Sequence[JobOutcome], timeout: float) -> list[bool | Exception]:
        """Commit a group's outcomes (in the writer's next transaction, with whatever else is
        waiting); each answers as `write` would, or with the error that failed it alone."""
        futures = self._submit(outcomes)
        deadline = time.monotonic() + timeout
        answers: list[bool | Exception] = []
        for future in futures:
            try:
                answers.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                future.cancel()
                raise
            except Exception as error:  # one bad outcome, split off by the writer
                if is_outage(error):
                    raise
                answers.append(error)
        return answers

    def close(self) -> None:
        """Stop after the outcomes already queued are written."""
        for lane in self._lanes:
            lane.close()

    def _write(self, outcomes: list[JobOutcome]) -> list[bool]:
        with self._sessions.begin() as session:
            held = record_outcomes(session, outcomes)
        # After the commit, never before: pgvector is the source of truth (the hook only
        # queues; Milvus is written by the mirror's own thread).
        self._mirror.written([o.listing for o, wrote in zip(outcomes, held, strict=True) if wrote])
        return held
