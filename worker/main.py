"""`listing-vision worker`: one Celery worker process holding one warm model."""

from __future__ import annotations

import gc
import logging
import socket
import uuid
from collections.abc import Sequence

from contract.broker import make_celery, model_queue, send_analysis, send_chunks
from contract.registry import get_spec, load_registry
from contract.settings import Settings
from worker.metrics import WorkerMetrics
from worker.runtime import Senders, start_runtime, worker_concurrency
from worker.tasks import register_tasks

log = logging.getLogger(__name__)


def worker_name(model_id: str, gpu: str | None) -> str:
    """Celery node name: which model, which GPU, which host (shown in Flower)."""
    where = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"{model_id}.{where}@{socket.gethostname()}"


def quiet_celery_task_lines(level: str) -> None:
    """One log line per job is the job runner's (listing, model, outcome, timings): Celery's
    own "received" and "succeeded" lines per task would triple it (and cost the GIL a
    formatted repr of each result). Unexpected task errors still log at ERROR; LV_LOG_LEVEL=DEBUG
    keeps Celery's lines."""
    if logging.getLevelName(level.upper()) == logging.DEBUG:
        return
    for name in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_worker(resolved: Settings, model_id: str, gpu: str | None) -> None:
    """Load the model, then consume its queue with a thread pool that feeds the batcher.

    Threads, not prefork: the jobs of one process must share one model and one batcher. The
    thread pool has no hard time limit, so fetches, model calls and queries carry their own
    deadlines, and a stall watchdog ends a process whose model call hangs.
    """
    registry = load_registry(resolved.models_file)
    spec = get_spec(registry, model_id)
    name = worker_name(model_id, gpu)
    app = make_celery(resolved)

    def send_jobs(job_ids: Sequence[uuid.UUID]) -> None:
        send_analysis(app, job_ids, spec.model_id)

    def resend_jobs(job_ids: Sequence[uuid.UUID], countdown: float | None) -> None:
        send_analysis(app, job_ids, spec.model_id, countdown=countdown)

    def send_run_chunks(chunk_ids: Sequence[uuid.UUID], countdown: float | None) -> None:
        send_chunks(app, chunk_ids, spec.model_id, countdown)

    metrics = None
    if resolved.metrics_port is not None:
        metrics = WorkerMetrics(spec.model_id)
        # One port per worker on a host: LV_METRICS_PORT + the GPU's index.
        port = resolved.metrics_port + (int(gpu) if gpu and gpu.isdigit() else 0)
        metrics.serve(port, resolved.metrics_host)
    runtime = start_runtime(
        resolved, registry, spec, name, Senders(send_jobs, send_run_chunks, resend_jobs), metrics
    )
    # Everything loaded so far (torch, the model, the libraries) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (tens of ms each time,
    # measured on a rescoring run: 5,500 listings/s became 9,000).
    gc.freeze()
    register_tasks(app, runtime)
    queue = model_queue(spec.model_id)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={worker_concurrency(resolved, spec)}",
        f"--queues={queue}",
        f"--hostname={name}",
        "--task-events",
        f"--loglevel={resolved.log_level}",
    ]
    quiet_celery_task_lines(resolved.log_level)
    log.info("worker %s consuming %s", name, queue)
    try:
        app.worker_main(argv)
    finally:
        runtime.close()
