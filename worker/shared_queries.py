"""The queries every job makes, shared by the jobs in flight: one claim statement and one
embedding-cache lookup for all deliveries that arrive together, instead of a round trip each.

Nothing waits to fill a group (`max_wait` 0): a job alone is claimed at once, and jobs that
arrive while a query runs are claimed together by the next one. Database errors fail the whole
group (a retry for each job), never a split into ever smaller retries of the same outage.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import embeddings, jobs
from db.embeddings import CachedImage
from db.jobs import ClaimedJob, Unclaimable
from worker.batching import DynamicBatcher

_MAX_GROUP = 256
QUERY_TIMEOUT = 120.0  # seconds; statements and pool waits have their own, shorter limits


def is_outage(error: Exception) -> bool:
    """A database error no single item caused: the connection, the server, a timeout."""
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated) or type(error).__name__ in {
            "OperationalError",
            "InterfaceError",
        }
    return isinstance(error, SQLAlchemyError | TimeoutError)


class SharedQueries:
    """Thread-safe: `claim` and `cached` block until their group's query answered. `sessions`
    should be bound to an autocommit engine (`make_engine(single_statements=True)`): each
    query is one statement, one round trip."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        model_id: str,
        worker: str,
        max_attempts: int,
        attempt_limit: timedelta,
    ) -> None:
        self._sessions = sessions
        self._model_id = model_id
        self._worker = worker
        self._max_attempts = max_attempts
        self._attempt_limit = attempt_limit  # an attempt running longer than this is dead
        self._claims: DynamicBatcher[uuid.UUID, ClaimedJob | Unclaimable] = DynamicBatcher(
            self._claim_group,
            max_size=_MAX_GROUP,
            max_wait=0.0,
            name="claims",
            splits_on=lambda _error: False,
        )
        self._lookups: DynamicBatcher[tuple[str, ...], dict[str, CachedImage]] = DynamicBatcher(
            self._lookup_group,
            max_size=_MAX_GROUP,
            max_wait=0.0,
            name="cache-lookups",
            splits_on=lambda _error: False,
        )

    def claim(self, job_id: uuid.UUID) -> ClaimedJob | Unclaimable:
        """Start an attempt of `job_id` (counted before any work); see `db.jobs.claim_many`."""
        future = self._claims.submit(job_id)
        try:
            return future.result(timeout=QUERY_TIMEOUT)
        except FutureTimeout:
            future.cancel()  # not yet in a group: never claimed (no attempt counted for it)
            raise

    def claim_now(self, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ClaimedJob | Unclaimable]:
        """Start an attempt of each of a group message's jobs: one statement in the calling
        thread (the group is its own group); `interrupted` ones as in `claim`."""
        with self._sessions() as session:
            return jobs.claim_many(
                session,
                job_ids,
                worker=self._worker,
                max_attempts=self._max_attempts,
                live_for=self._attempt_limit,
            )

    def claim_interrupted(self, job_id: uuid.UUID) -> ClaimedJob | Unclaimable:
        """Start an attempt of `job_id` even if an earlier one never finished (the group claim
        answers such a job `interrupted`); one statement of its own, not grouped: the caller
        runs these one at a time."""
        with self._sessions() as session:
            return jobs.claim(
                session,
                job_id,
                worker=self._worker,
                max_attempts=self._max_attempts,
                live_for=self._attempt_limit,
                interrupted=True,
            )

    def cached(self, shas: Sequence[str]) -> dict[str, CachedImage]:
        """The images among `shas` this model has embedded already, with their embeddings."""
        if not shas:
            return {}
        return self._lookups.submit(tuple(shas)).result(timeout=QUERY_TIMEOUT)

    def close(self) -> None:
        self._claims.close()
        self._lookups.close()
        engine = self._sessions.kw.get("bind")
        if engine is not None:
            engine.dispose()

    def _lookup(self, shas: list[str]) -> dict[str, CachedImage]:
        with self._sessions() as session:
            return embeddings.cached_images(session, shas, self._model_id)

    def _claim_group(self, job_ids: list[uuid.UUID]) -> list[ClaimedJob | Unclaimable]:
        claimed = self.claim_now(job_ids)  # autocommit: the claim is one statement
        # One job delivered twice in one group: the first delivery runs; the second finds its
        # attempt already taken, as it would a moment later.
        seen: set[uuid.UUID] = set()
        answers: list[ClaimedJob | Unclaimable] = []
        for job_id in job_ids:
            answer = claimed[job_id]
            if job_id in seen and isinstance(answer, ClaimedJob):
                answer = Unclaimable("duplicate", answer.listing.listing_id, answer.model_id)
            seen.add(job_id)
            answers.append(answer)
        return answers

    def _lookup_group(self, groups: list[tuple[str, ...]]) -> list[dict[str, CachedImage]]:
        wanted = sorted({sha for shas in groups for sha in shas})
        try:
            found = self._lookup(wanted)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            # A pooled connection the server dropped (no pre-ping on this engine): the pool
            # has replaced it; a read is safe to ask again.
            found = self._lookup(wanted)
        return [{sha: found[sha] for sha in shas if sha in found} for shas in groups]
