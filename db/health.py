"""What the database says about progress, per model: work waiting, work running, last finish."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from db.schema import Job, Model


@dataclass(frozen=True)
class ModelWork:
    """One model's jobs that are not finished, and when one last finished."""

    model_id: str
    queued: int
    running: int
    oldest_waiting: datetime | None  # the oldest queued job's creation
    last_finished: datetime | None


def work_by_model(session: Session) -> list[ModelWork]:
    """Every model with unfinished jobs, or with any job at all, in model order."""
    waiting = func.count().filter(Job.status == "queued")
    running = func.count().filter(Job.status == "running")
    oldest = func.min(Job.created_at).filter(Job.status == "queued")
    finished = func.max(Job.finished_at)
    rows = session.execute(
        select(Job.model_id, waiting, running, oldest, finished)
        .group_by(Job.model_id)
        .order_by(Job.model_id)
    ).all()
    return [ModelWork(*row) for row in rows]


def database_now(session: Session) -> datetime:
    """The database's clock, so ages are measured on one clock."""
    return session.execute(select(func.now())).scalar_one()


@dataclass(frozen=True)
class ModelBacklog:
    """One registered model's unfinished jobs, for the exporter (zeros when it has none)."""

    model_id: str
    queued: int
    running: int
    oldest_queued_seconds: float  # 0 when nothing is queued


def backlog_by_model(session: Session) -> list[ModelBacklog]:
    """Every model of the `models` table with its queued and running jobs. Only unfinished
    jobs are read (the status index), so a scrape costs the same on a catalogue of millions."""
    active = and_(Job.model_id == Model.model_id, Job.status.in_(("queued", "running")))
    queued = Job.status == "queued"
    oldest = func.min(Job.created_at).filter(queued)
    age = func.coalesce(func.extract("epoch", func.now() - oldest), 0)
    rows = session.execute(
        select(
            Model.model_id,
            func.count(Job.job_id).filter(queued),
            func.count(Job.job_id).filter(Job.status == "running"),
            age,
        )
        .select_from(Model)
        .outerjoin(Job, active)
        .group_by(Model.model_id)
        .order_by(Model.model_id)
    ).all()
    return [ModelBacklog(m, int(q), int(r), float(a)) for m, q, r, a in rows]
