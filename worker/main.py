"""`listing-vision worker`: one Celery worker process holding one warm model."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from db.jobs import NewJob
from listing_vision.settings import Settings
from worker.app import make_celery, send_analysis_tasks
from worker.models.registry import get_spec, load_registry
from worker.runtime import start_runtime, worker_concurrency
from worker.tasks import register_tasks

log = logging.getLogger(__name__)


def worker_name(model_id: str, gpu: str | None) -> str:
    """Celery node name: which model, which GPU, which host (shown in Flower)."""
    where = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"{model_id}.{where}@{socket.gethostname()}"


def run_worker(
    settings: Settings, model_id: str, database_url: str, broker_url: str, gpu: str | None
) -> None:
    """Load the model, then consume its queue with a thread pool that feeds the batcher.

    Threads, not prefork: the jobs of one process must share one model and one batcher. The
    thread pool has no hard time limit, so fetches, model calls and queries carry their own
    deadlines, and a stall watchdog ends a process whose model call hangs.
    """
    spec = get_spec(load_registry(settings.models_file), model_id)
    name = worker_name(model_id, gpu)
    app = make_celery(settings, broker_url)

    def send(jobs: Sequence[NewJob]) -> None:
        send_analysis_tasks(app, jobs, spec.queue)

    runtime = start_runtime(settings, spec, database_url, name, send)
    register_tasks(app, runtime)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={worker_concurrency(settings, spec)}",
        f"--queues={spec.queue}",
        f"--hostname={name}",
        "--task-events",
        f"--loglevel={settings.log_level}",
    ]
    log.info("worker %s consuming %s", name, spec.queue)
    try:
        app.worker_main(argv)
    finally:
        runtime.close()
