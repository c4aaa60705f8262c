"""What the database says about progress, per model: work waiting, work running, last finish."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.schema import Job


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
