"""The broker contract: Celery's configuration, the task and queue names, the message's shape.

Both sides build their Celery app here, so a producer and a worker can never disagree on
serialisation, acknowledgement or routing. Importing this module does not import torch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from celery import Celery

from contract.redis_transport import TRANSPORT
from contract.settings import Settings

ANALYZE_TASK = "lv.analyze"
# Several jobs of one `enqueue` call in one message (LV_ENQUEUE_GROUP), analysed together.
ANALYZE_GROUP_TASK = "lv.analyze_group"
RUN_CHUNK_TASK = "lv.run_chunk"
# Beat's own tasks, consumed by the beat process itself on the control queue.
RESCORE_TASK = "lv.rescore_catalogue"
WATCH_RUNS_TASK = "lv.watch_runs"
CONTROL_QUEUE = "lv.control"
STATS_COMMAND = "lv_stats"  # remote control: app.control.broadcast("lv_stats", reply=True)


def model_queue(model_id: str) -> str:
    """The queue that carries one model's jobs: a worker consumes only its own model's queue."""
    return f"lv.{model_id}"


def queue_keys(model_id: str) -> list[str]:
    """The Redis lists that hold a model's queue. kombu's Redis transport keeps one list per
    priority step: the plain name for priority 0 (all of ours), the name, kombu's separator
    and the step for the others. A queue's depth is the sum of their lengths, as kombu's own
    `_size` counts it."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    queue = model_queue(model_id)
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


UNACKED_KEY = "unacked"  # kombu's hash of messages delivered and not yet acknowledged


@dataclass(frozen=True)
class AnalyzeMessage:
    """What an analysis task carries: only the job's id (the task id too). The listing itself
    is read from the database, so a message never holds stale or secret data."""

    job_id: uuid.UUID

    def kwargs(self) -> dict[str, str]:
        """The task's keyword arguments (JSON)."""
        return {"job_id": str(self.job_id)}

    @classmethod
    def parse(cls, job_id: str) -> AnalyzeMessage:
        """The message from the task's keyword arguments."""
        return cls(uuid.UUID(job_id))


MAX_GROUP = 256  # jobs in one group message at most


@dataclass(frozen=True)
class GroupMessage:
    """What a group task carries: only its jobs' ids (its task id is a fresh one). Each job
    keeps its own attempts, outcome and retries; the group only shares a delivery."""

    job_ids: tuple[uuid.UUID, ...]

    def kwargs(self) -> dict[str, list[str]]:
        """The task's keyword arguments (JSON)."""
        return {"job_ids": [str(job_id) for job_id in self.job_ids]}

    @classmethod
    def parse(cls, job_ids: Sequence[str]) -> GroupMessage:
        """The message from the task's keyword arguments; refuses an empty or oversized one."""
        if not 1 <= len(job_ids) <= MAX_GROUP:
            raise ValueError(f"a group message holds 1 to {MAX_GROUP} jobs, not {len(job_ids)}")
        return cls(tuple(uuid.UUID(job_id) for job_id in job_ids))


@dataclass(frozen=True)
class ChunkMessage:
    """What a run's chunk task carries: only the chunk's id (the task id too); its listings
    and its run are read from the database."""

    chunk_id: uuid.UUID

    def kwargs(self) -> dict[str, str]:
        """The task's keyword arguments (JSON)."""
        return {"chunk_id": str(self.chunk_id)}

    @classmethod
    def parse(cls, chunk_id: str) -> ChunkMessage:
        """The message from the task's keyword arguments."""
        return cls(uuid.UUID(chunk_id))


_PUBLISH_BATCH = 500  # Redis commands per pipeline (two per task: the message, its event)


def make_celery(settings: Settings) -> Celery:
    """A Celery app with the delivery guarantees SPEC.md promises (JSON only, late acks)."""
    broker_url = settings.require_broker_url()
    app = Celery("listing_vision", broker=broker_url, set_as_current=False)
    transport = {
        # A message not acknowledged within this many seconds is delivered again; it must
        # exceed the longest an attempt may take (LV_TASK_TIME_LIMIT, checked in Settings).
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": settings.broker_timeout,
        "socket_connect_timeout": settings.broker_timeout,
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
        broker_connection_timeout=settings.broker_timeout,
        # A publish that times out is tried once more, then raises: the job stays unsent in
        # the database, and the reconciler sends it when the broker answers again.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 1,
            "interval_max": 1,
        },
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
    # Plain redis:// only: an explicit transport makes kombu skip the `rediss` branch that
    # turns TLS on, so TLS brokers keep kombu's own transport.
    if broker_url.split("://", 1)[0] == "redis":
        app.conf.broker_transport = TRANSPORT  # kombu's, minus a new client per publish
    return app


def send_analysis(
    app: Celery,
    job_ids: Sequence[uuid.UUID],
    model_id: str,
    *,
    group_size: int = 1,
    countdown: float | None = None,
) -> None:
    """Publish the jobs on the model's queue: one analysis task per job (the task id is the
    job id), or with `group_size` > 1 group tasks of up to that many jobs each, which a worker
    claims, analyses and commits together (one message, one claim, one transaction). A job
    left alone in the last group goes as a plain task. `countdown` delays them (a retry)."""
    if not job_ids:
        return
    queue = model_queue(model_id)
    size = max(1, min(group_size, MAX_GROUP))
    groups = [job_ids[start : start + size] for start in range(0, len(job_ids), size)]
    with app.producer_or_acquire() as producer, _publish_batch(producer):
        for group in groups:
            kwargs: dict[str, Any]
            if len(group) == 1:
                name, kwargs, task_id = ANALYZE_TASK, AnalyzeMessage(group[0]).kwargs(), group[0]
            else:
                name, kwargs = ANALYZE_GROUP_TASK, GroupMessage(tuple(group)).kwargs()
                task_id = uuid.uuid4()
            app.send_task(
                name,
                kwargs=kwargs,
                queue=queue,
                task_id=str(task_id),
                countdown=countdown,
                producer=producer,
            )


def send_chunks(
    app: Celery, chunk_ids: Sequence[uuid.UUID], model_id: str, countdown: float | None = None
) -> None:
    """Publish one task per run chunk on the model's queue; the task id is the chunk id.
    `countdown` delays them (a retry chunk's backoff)."""
    if not chunk_ids:
        return
    queue = model_queue(model_id)
    with app.producer_or_acquire() as producer, _publish_batch(producer):
        for chunk_id in chunk_ids:
            app.send_task(
                RUN_CHUNK_TASK,
                kwargs=ChunkMessage(chunk_id).kwargs(),
                queue=queue,
                task_id=str(chunk_id),
                countdown=countdown,
                producer=producer,
            )


def _publish_batch(producer: Any) -> AbstractContextManager[Any]:
    """Kombu 5.7's publish batch: a Redis pipeline per few hundred messages instead of a round
    trip (and a new client) per message and per task-sent event; ~7 ms a task became well under
    one. On failure nothing unflushed is sent, and the jobs stay unsent for the reconciler.
    Older kombu publishes one by one."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=_PUBLISH_BATCH) if batch is not None else nullcontext()
