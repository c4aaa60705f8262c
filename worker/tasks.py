"""The Celery task: decode the message, run the job, turn the report into an ack or a retry."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery, Task

from worker.app import ANALYZE_TASK
from worker.runtime import WorkerRuntime


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the analysis task to this process's warm runtime."""

    @app.task(name=ANALYZE_TASK, bind=True, acks_late=True, max_retries=None)
    def analyze(self: Task, job_id: str, listing_id: str | None = None) -> dict[str, Any]:
        report = runtime.runner.run(uuid.UUID(job_id))
        if report.retry_in is not None:
            raise self.retry(countdown=report.retry_in, max_retries=None)
        return report.summary
