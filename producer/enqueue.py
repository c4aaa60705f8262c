"""Events in, jobs out: record listings and jobs, commit, and only then send the tasks.

A large call does that in slices (`RECORD_SLICE` listings each), so the first jobs are on the
queue, and a worker busy with them, while the rest are still being recorded: a 3,000-listing
call no longer waits a second and more for one commit before anything starts."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from contract.broker import make_celery, send_analysis
from contract.errors import one_line
from contract.registry import ModelSpec, configured_spec, get_spec, load_registry
from contract.settings import Settings
from db import jobs, listings, registered_models, runs
from db.engine import make_engine, make_sessions
from db.jobs import NewJob
from db.schema import TERMINAL_JOB_STATES
from producer.events import ListingEvent, Refusal, parse_event

Progress = Callable[[Counter[str]], None]
RECORD_SLICE = 512  # listings recorded, committed and sent together within one call


log = logging.getLogger(__name__)
OUTAGE_LIMIT = 60.0  # seconds `wait` rides out a database that does not answer


class DatabaseUnavailable(RuntimeError):
    """Waiting for jobs stopped: the database has not answered for too long."""


@dataclass
class EnqueueReport:
    """What was queued (one job per listing) and what was refused."""

    model_id: str
    job_ids: list[uuid.UUID] = field(default_factory=list)
    listing_ids: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


class Producer:
    """The catalogue's entry point: `enqueue` events, optionally `wait` for their results."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = load_registry(settings.models_file)
        self.default_spec = configured_spec(self.registry, settings.model)  # LV_MODEL
        self.engine = make_engine(
            settings.require_database_url(), application_name="listing-vision-producer"
        )
        self.sessions: sessionmaker[Session] = make_sessions(self.engine)
        self.celery: Celery = make_celery(settings)
        self._recorded_models: set[str] = set()

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def resolve_model(self, model_id: str | None) -> ModelSpec:
        """The named model, else the active one (a `reindex` switch, else `LV_MODEL`)."""
        if model_id is None:
            model_id = registered_models.active_model_id(self.engine, self.settings.model)
        return get_spec(self.registry, model_id)

    def enqueue(
        self, events: Iterable[ListingEvent | dict[str, Any]], model: str | None = None
    ) -> EnqueueReport:
        """Record and queue; raw events are validated first (a `ListingEvent` already is), and
        invalid ones are refused and never reach a worker. The valid ones are recorded and
        sent a slice at a time: if a slice cannot be recorded, the call raises and the slices
        before it stay queued (enqueueing them again is harmless: a listing is analysed
        again and its result row replaced)."""
        spec = self.resolve_model(model)
        report = EnqueueReport(spec.model_id)
        latest: dict[str, ListingEvent] = {}
        for number, raw in enumerate(events, start=1):
            parsed = self._validate(raw, number)
            if isinstance(parsed, Refusal):
                report.refused.append(parsed)
            else:
                latest[parsed.listing_id] = parsed  # the last event for a listing wins
        queued: dict[str, list[uuid.UUID]] = {spec.model_id: []}
        # Whole messages per slice (LV_ENQUEUE_GROUP jobs each), as one call would send them.
        group = max(1, self.settings.enqueue_group)
        size = -(-RECORD_SLICE // group) * group
        events_in_order = list(latest.values())
        for start in range(0, len(events_in_order), size):
            # Per slice: a reindex run that starts during a long call sees the later slices.
            specs = [spec] if model is not None else self._serving(spec)
            new_jobs = self._record(events_in_order[start : start + size], specs)
            # Sent only after the commit: a worker never receives a job it cannot find.
            for s in specs:
                self.send(new_jobs[s.model_id], s)
                queued.setdefault(s.model_id, []).extend(j.job_id for j in new_jobs[s.model_id])
        report.job_ids = [job_id for ids in queued.values() for job_id in ids]
        report.listing_ids = list(latest)
        return report

    def _record(
        self, events: Sequence[ListingEvent], specs: Sequence[ModelSpec]
    ) -> dict[str, list[NewJob]]:
        """One slice's listings and a job per listing and model, in one transaction."""
        new_jobs = {
            s.model_id: [NewJob(uuid.uuid4(), event.listing_id, s.model_id) for event in events]
            for s in specs
        }
        with self.sessions.begin() as session:
            for s in specs:
                if s.model_id not in self._recorded_models:  # once per producer: no row lock
                    registered_models.ensure_model(session, s)
                    registered_models.record_default_model(session, self.default_spec)
            listings.upsert_listings(session, [event.to_record() for event in events])
            jobs.create_jobs(session, [job for batch in new_jobs.values() for job in batch])
        self._recorded_models.update(new_jobs)
        return new_jobs

    def _serving(self, active: ModelSpec) -> list[ModelSpec]:
        """The active model, and the model a reindex run is embedding the catalogue with (it
        must see the listings that change during the run, so nothing is stale at its switch)."""
        with self.sessions() as session:
            target = runs.reindex_target(session)
        if target is None or target == active.model_id:
            return [active]
        return [active, get_spec(self.registry, target)]

    def send(self, new_jobs: Sequence[NewJob], spec: ModelSpec) -> None:
        """Hand committed jobs to the broker on the model's queue; the task id is the job id."""
        if not new_jobs:
            return
        send_analysis(
            self.celery,
            [job.job_id for job in new_jobs],
            spec.model_id,
            group_size=self.settings.enqueue_group,
        )
        with self.sessions.begin() as session:
            jobs.mark_sent(session, [job.job_id for job in new_jobs])

    def wait(
        self,
        job_ids: Sequence[uuid.UUID],
        *,
        timeout: float | None = None,
        on_progress: Progress | None = None,
        poll_interval: float = 0.5,
    ) -> Counter[str]:
        """Block until every job is finished (or `timeout` passes); returns the state counts.
        A database that stops answering (a restart, a failover) is waited out for up to
        `OUTAGE_LIMIT` seconds, then `DatabaseUnavailable`: the jobs go on without us."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        while True:
            try:
                with self.sessions() as session:
                    counts = jobs.status_counts(session, job_ids)
            except OperationalError as error:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("the database does not answer; waiting: %s", one_line(error))
                out_of_time = deadline is not None and now > deadline
                if now - down_since > OUTAGE_LIMIT or out_of_time:
                    raise DatabaseUnavailable(
                        f"the database did not answer for {now - down_since:.0f} s while "
                        f"waiting for the jobs (they go on; `listing-vision results` shows "
                        f"them later): {one_line(error)}"
                    ) from None
                time.sleep(max(poll_interval, 1.0))
                continue
            down_since = None
            if on_progress:
                on_progress(counts)
            finished = sum(counts[state] for state in TERMINAL_JOB_STATES)
            if finished >= len(job_ids):
                return counts
            if deadline is not None and time.monotonic() > deadline:
                return counts
            time.sleep(poll_interval)

    def _validate(self, raw: ListingEvent | dict[str, Any], number: int) -> ListingEvent | Refusal:
        if not isinstance(raw, ListingEvent):
            return parse_event(raw, number, self.settings.file_roots)
        problem = raw.file_url_problem(self.settings.file_roots)
        return Refusal(number, raw.listing_id, problem) if problem else raw
