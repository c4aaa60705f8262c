"""The Celery task and remote-control command: thin wrappers around the warm runtime."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Celery, Task
from celery.signals import task_revoked
from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from contract.broker import (
    ANALYZE_GROUP_TASK,
    ANALYZE_TASK,
    RUN_CHUNK_TASK,
    STATS_COMMAND,
    AnalyzeMessage,
    ChunkMessage,
    GroupMessage,
)
from worker.runtime import WorkerRuntime
from worker.thread_cpu import cpu_seconds_by_thread


class ListingFailed(Exception):
    """The listing ended `failed` (or its job `dead`); the message is the row's error."""


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the analysis task and the `lv_stats` command to this process's warm runtime."""

    @app.task(
        name=ANALYZE_TASK, bind=True, acks_late=True, max_retries=None, throws=(ListingFailed,)
    )
    def analyze(self: Task, job_id: str) -> dict[str, Any]:
        job = AnalyzeMessage.parse(job_id).job_id
        report = runtime.groups.run_one(job, redeliveries=self.request.retries or 0)
        if report.retry_in is None:
            if report.summary.get("status") == "failed":
                # Its row is committed; the task fails too, so Flower counts and shows it with
                # its readable error (`throws`: logged in one line, no traceback).
                raise ListingFailed(report.summary.get("error") or "failed")
            return report.summary
        # Publish the retry first; if that fails Celery rejects the message and the job stays
        # "not in the broker" for the reconciler. Only a published retry is marked as sent.
        retry = self.retry(countdown=report.retry_in, max_retries=None, throw=False)
        runtime.runner.mark_resent(job)
        raise retry

    @app.task(
        name=ANALYZE_GROUP_TASK,
        bind=True,
        acks_late=True,
        max_retries=None,
        throws=(ListingFailed,),
    )
    def analyze_group(self: Task, job_ids: list[str]) -> dict[str, Any]:
        group = GroupMessage.parse(job_ids).job_ids
        # A job revoked by its id (Flower, `celery control revoke`) while it waited in a group
        # is in every worker's revoked set: it ends `failed` as a revoked single job does.
        revoked = [job_id for job_id in group if str(job_id) in worker_state.revoked]
        for job_id in revoked:
            runtime.runner.revoked(job_id)
        group = tuple(job_id for job_id in group if job_id not in revoked)
        if not group:
            return {"jobs": len(revoked), "revoked": len(revoked)}
        report = runtime.groups.run_message(group, redeliveries=self.request.retries or 0)
        if report.retry_in is None:
            if report.summary.get("failed"):
                # As a single job's: Flower counts the group failed and shows which listings
                # failed and why (their rows are committed).
                raise ListingFailed(group_failure(report.summary))
            return report.summary
        # Nothing of it was committed: the whole message again (its claimed jobs then come
        # back `interrupted`, and each is sent on as a single job).
        raise self.retry(countdown=report.retry_in, max_retries=None)

    @app.task(name=RUN_CHUNK_TASK, bind=True, acks_late=True, max_retries=None)
    def run_chunk(self: Task, chunk_id: str) -> dict[str, Any]:
        chunk = ChunkMessage.parse(chunk_id).chunk_id
        report = runtime.chunks.run(chunk, redeliveries=self.request.retries or 0)
        if report.retry_in is None:
            return report.summary
        # The chunk stays `running`; its next delivery is split, and the reconciler re-sends
        # it if this retry is never published.
        raise self.retry(countdown=report.retry_in, max_retries=None)

    @task_revoked.connect(sender=analyze, weak=False)
    def on_revoked(request: Any = None, **_: Any) -> None:
        job_id = getattr(request, "id", None)
        if job_id:
            # Sent from the consumer's event loop: the database work goes to a pool thread.
            runtime.executor.submit(runtime.runner.revoked, AnalyzeMessage.parse(job_id).job_id)

    @task_revoked.connect(sender=analyze_group, weak=False)
    def on_group_revoked(request: Any = None, **_: Any) -> None:
        kwargs = getattr(request, "kwargs", None) or {}
        for job_id in kwargs.get("job_ids") or []:  # a malformed message has nothing to end
            runtime.executor.submit(runtime.runner.revoked, AnalyzeMessage.parse(job_id).job_id)

    @inspect_command(name=STATS_COMMAND)
    def lv_stats(state: Any) -> dict[str, Any]:
        """How the model has been used: batches, model calls, items; CPU seconds by kind of
        thread (for operators, tests and the bench)."""
        return {
            "model": runtime.spec.model_id,
            "device": str(runtime.backend.device),
            "batches": asdict(runtime.service.batcher.stats),
            "model_calls": asdict(runtime.service.calls),
            "cpu_seconds_by_thread": cpu_seconds_by_thread(),
        }


def group_failure(summary: dict[str, Any]) -> str:
    """A group's failed listings in one line: how many, then the first few with their errors."""
    errors = summary.get("errors") or {}
    named = "; ".join(f"{listing_id}: {error}" for listing_id, error in errors.items())
    more = summary["failed"] - len(errors)
    tail = f"; and {more} more" if more > 0 else ""
    return f"{summary['failed']} of {summary['jobs']} listings failed: {named}{tail}"
