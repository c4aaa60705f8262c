"""The Celery wiring, in one place: broker settings, delivery guarantees, task and queue names.

Importing this module does not import torch, so the producer and Flower can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from db.jobs import NewJob
from listing_vision.settings import Settings

ANALYZE_TASK = "lv.analyze"
STATS_COMMAND = "lv_stats"  # remote control: app.control.broadcast("lv_stats", reply=True)


def make_celery(settings: Settings, broker_url: str) -> Celery:
    """A Celery app with the delivery guarantees SPEC.md promises (JSON only, late acks)."""
    app = Celery("listing_vision", broker=broker_url, set_as_current=False)
    transport = {
        # A message not acknowledged within this many seconds is delivered again; it must
        # exceed the hard time limit (checked in Settings).
        "visibility_timeout": settings.visibility_timeout,
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results live in PostgreSQL, not in the broker
        task_acks_late=True,  # ack only after the result is committed
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Flower needs the events; "started" lets it show what a worker is doing now.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue="lv.default",
        worker_hijack_root_logger=False,
        worker_soft_shutdown_timeout=float(min(settings.task_time_limit, 60)),
        worker_enable_soft_shutdown_on_idle=True,
    )
    return app


def send_analysis_tasks(app: Celery, jobs: Sequence[NewJob], queue: str) -> None:
    """Publish one analysis task per job on the model's queue; the task id is the job id, and
    the message carries only ids (the listing itself is read from the database)."""
    if not jobs:
        return
    with app.producer_or_acquire() as connection:
        for job in jobs:
            app.send_task(
                ANALYZE_TASK,
                kwargs={"job_id": str(job.job_id), "listing_id": job.listing_id},
                queue=queue,
                task_id=str(job.job_id),
                producer=connection,
            )
