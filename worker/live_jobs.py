"""The jobs this worker process is claiming or running now, so that a second delivery of one
of them (a broker redelivery, the reconciler's re-send of a job it thought lost) waits for the
live attempt instead of taking the job from it.

The database cannot tell a duplicate of a live attempt from an attempt whose worker died: both
leave the job `running`, and an interrupted job is claimed again on its own
(`worker.job_runner`). Within one process this registry can tell: a job held here is live, and
a duplicate that claimed it anyway would cost it an attempt (reproduced under load: a worker
slow to start let the reconciler re-send a group's jobs, the re-sent copies claimed them from
the running group, and the poison listing's crash then took two attempts from each)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class LiveJobs:
    """Job ids held by one thread each, from before their claim until their outcome is in."""

    def __init__(self) -> None:
        self._held: set[uuid.UUID] = set()
        self._changed = threading.Condition()

    def __contains__(self, job_id: object) -> bool:
        with self._changed:
            return job_id in self._held

    @contextmanager
    def holding(self, job_id: uuid.UUID, timeout: float) -> Iterator[bool]:
        """Hold `job_id`, waiting up to `timeout` seconds for another thread's hold to end.
        Yields False (holding nothing) when it did not end in time."""
        with self._changed:
            free = self._changed.wait_for(lambda: job_id not in self._held, timeout)
            if free:
                self._held.add(job_id)
        try:
            yield free
        finally:
            if free:
                self.release([job_id])

    def try_hold(self, job_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Hold each of `job_ids` no other thread holds, without waiting; the ones now held."""
        with self._changed:
            taken = set(job_ids) - self._held
            self._held |= taken
        return taken

    def release(self, job_ids: Iterable[uuid.UUID]) -> None:
        with self._changed:
            self._held.difference_update(job_ids)
            self._changed.notify_all()
