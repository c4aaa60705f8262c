"""`listing-vision beat`: Celery beat, with the worker that runs its two tasks.

Beat sends `lv.rescore_catalogue` on `LV_RESCORE_SCHEDULE` (nightly by default) and
`lv.watch_runs` every minute, both to the control queue, which this same process consumes (one
process, `--beat` embedded in a one-slot worker). Rescoring starts a run of the whole catalogue
with the active model; while one is pending or running a second is refused (logged), so runs
never overlap. The watch continues the production of runs whose producer stopped halfway.
With `LV_MILVUS_URI` set, the scheduled rescoring is followed by a catch-up of the Milvus mirror
with pgvector (what workers could not mirror while Milvus was away, or lost by stopping).
Run exactly one beat per deployment (`up` starts it; Kubernetes: a single replica).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.schedules import crontab, schedule

from contract.broker import CONTROL_QUEUE, RESCORE_TASK, WATCH_RUNS_TASK, make_celery
from contract.errors import one_line
from contract.settings import Settings, crontab_fields, schedule_seconds
from db import embedding_index, runs
from db.milvus import MirrorMismatch, MirrorUnavailable, open_store
from db.mirror import catch_up_all
from db.run_completion import finish_restamp
from db.runs import RunConflict
from producer.enqueue import Producer
from producer.runs import RunProducer

log = logging.getLogger(__name__)
WATCH_EVERY = 60.0  # seconds
STALLED_PRODUCTION = timedelta(minutes=2)
COMPLETION_TRIES = 5  # a left-open run's completions tried before passing trouble fails it
WATCH_RESTAMP_SECONDS = 40.0  # of a pending restamp per watch; the next watch goes on


@dataclass
class CompletionTries:
    """How often beat's watch has tried to complete each run left open, in a row: a reindex
    whose index build keeps failing for a passing reason (a server that restarts, or crashes,
    at every try) fails at the last try instead of being tried every minute forever. A try
    while some process holds the build lock does not count: that build may take hours."""

    limit: int = COMPLETION_TRIES
    tried: Counter[uuid.UUID] = field(default_factory=Counter)

    def still_open(self, run_ids: Iterable[uuid.UUID]) -> None:
        """Forget the runs no longer left open (completed, failed, cancelled)."""
        kept = set(run_ids)
        for run_id in [r for r in self.tried if r not in kept]:
            del self.tried[run_id]

    def next_is_last(self, run_id: uuid.UUID, someone_building: bool) -> bool:
        """Count a try of `run_id`; True when it is the last before giving up."""
        if someone_building:
            return False
        self.tried[run_id] += 1
        return self.tried[run_id] >= self.limit


def rescore_schedule(value: str) -> schedule | crontab:
    """`LV_RESCORE_SCHEDULE` as beat reads it: a crontab (in UTC) or `every N` seconds."""
    seconds = schedule_seconds(value)
    if seconds is not None:
        return schedule(timedelta(seconds=seconds))
    return crontab(**crontab_fields(value))


def make_beat_app(resolved: Settings) -> Celery:
    """The Celery app with beat's schedule and the two tasks it sends."""
    app = make_celery(resolved)
    app.conf.beat_schedule = {
        "rescore-catalogue": {
            "task": RESCORE_TASK,
            "schedule": rescore_schedule(resolved.rescore_schedule),
            "options": {"queue": CONTROL_QUEUE},
        },
        "watch-runs": {
            "task": WATCH_RUNS_TASK,
            "schedule": WATCH_EVERY,
            "options": {"queue": CONTROL_QUEUE},
        },
    }

    # Not shared: Celery hands a shared task to every app made afterwards, and a second beat app
    # in one process (tests) would then run the first one's closure, over the first settings.
    @app.task(name=RESCORE_TASK, shared=False)
    def rescore_catalogue() -> dict[str, Any]:
        with Producer(resolved) as producer:
            try:
                run_id = RunProducer(producer).start_rescore(scope="all")
                outcome: dict[str, Any] = {"run_id": str(run_id)}
                log.info("scheduled rescoring run %s started", run_id)
            except RunConflict as conflict:
                log.warning("scheduled rescoring not started: %s", conflict)
                outcome = {"skipped": str(conflict)}
        # The run is on its way (workers do it); meanwhile this process catches the mirror up.
        return {**outcome, **catch_up_mirror(resolved)}

    tries = CompletionTries()

    @app.task(name=WATCH_RUNS_TASK, shared=False)
    def watch_runs() -> dict[str, Any]:
        resumed, completed = [], []
        with Producer(resolved) as producer:
            with producer.sessions() as session:
                stalled = runs.unproduced_runs(session, STALLED_PRODUCTION)
                left_open = runs.done_runs_left_open(session, STALLED_PRODUCTION)
                building = embedding_index.build_under_way(session)
            tries.still_open(run.run_id for run in left_open)
            for run in stalled:  # one run's trouble never stops the others'
                log.warning("run %s stopped being produced: producing the rest", run.run_id)
                try:
                    RunProducer(producer).produce(run.run_id)
                    resumed.append(str(run.run_id))
                except Exception as error:
                    log.warning("run %s not produced: %s", run.run_id, one_line(error))
            for run in left_open:  # its completing process died, or is building an index
                last = tries.next_is_last(run.run_id, building)
                try:
                    if RunProducer(producer).complete(run.run_id, last_try=last) is not None:
                        log.warning("run %s was done but left open: completed it", run.run_id)
                        completed.append(str(run.run_id))
                except Exception as error:
                    log.warning("run %s not completed: %s", run.run_id, one_line(error))
            # A switch's restamp its process did not finish (it died, or lost the database):
            # at most WATCH_RESTAMP_SECONDS a watch, so the next one is not held up.
            restamped = finish_restamp(producer.engine, WATCH_RESTAMP_SECONDS)
            if restamped:
                log.warning("went on with the restamp after a switch: %d rows", restamped)
        return {"produced": resumed, "completed": completed, "restamped": restamped}

    return app


def catch_up_mirror(resolved: Settings) -> dict[str, Any]:
    """The nightly catch-up of the Milvus mirror (when one is set): what it wrote, per model.
    Milvus away is logged, and the next night (or `listing-vision mirror`) tries again."""
    if resolved.milvus_uri is None:
        return {}
    with Producer(resolved) as producer:
        try:
            with open_store(resolved) as store:
                reports, _ = catch_up_all(producer.sessions, store)
        except (MirrorUnavailable, MirrorMismatch) as error:
            log.warning("Milvus mirror not caught up: %s", error)
            return {"mirror": str(error)}
    written = {report.model_id: report.written for report in reports}
    log.info("Milvus mirror caught up: %s embedding(s) written", written)
    return {"mirrored": written}


def run_beat(resolved: Settings) -> None:
    """Run beat and its control-queue worker in the foreground until stopped."""
    app = make_beat_app(resolved)
    home = resolved.home.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    app.worker_main(
        [
            "worker",
            "--beat",
            f"--schedule={home / 'beat-schedule'}",
            "--pool=solo",
            f"--queues={CONTROL_QUEUE}",
            "--hostname=beat@%h",
            f"--loglevel={resolved.log_level}",
        ]
    )
