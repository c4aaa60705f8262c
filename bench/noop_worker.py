"""A Celery worker shaped like `listing-vision worker` whose analysis task does nothing.

    python -m bench.noop_worker lv.bench-noop [--model lv-toy]

Same app (`contract.broker.make_celery`: JSON, late acks, prefetch multiplier 1, task events),
thread pool and concurrency as a real worker of MODEL, but no model and no database: draining
its queue measures what the broker and Celery alone cost per message, the ceiling the pipeline
benchmark is held against. Reads the broker URL from `LV_BROKER_URL`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import socket

from celery import Celery

from contract.broker import ANALYZE_TASK, AnalyzeMessage, make_celery
from contract.registry import get_spec, load_registry
from contract.settings import Settings, load_settings
from worker.runtime import worker_concurrency

NODE = f"bench-noop@{socket.gethostname()}"  # its Celery node name, for remote control


def noop_app(settings: Settings) -> Celery:
    """The broker contract's app with a do-nothing task under the analysis task's name."""
    app = make_celery(settings)

    @app.task(name=ANALYZE_TASK, bind=True, acks_late=True, max_retries=None)
    def analyze(self: object, job_id: str) -> dict[str, str]:
        return {"job_id": str(AnalyzeMessage.parse(job_id).job_id)}  # parse, as the real one

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue", help="the queue to consume, e.g. lv.bench-noop")
    parser.add_argument("--model", default="lv-toy", help="whose worker shape to copy")
    args = parser.parse_args()
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = get_spec(load_registry(settings.models_file), args.model)
    app = noop_app(settings)
    gc.freeze()  # as worker.main does once its model is loaded
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={worker_concurrency(settings, spec)}",
            f"--queues={args.queue}",
            f"--hostname={NODE}",
            "--task-events",
            f"--loglevel={settings.log_level}",
        ]
    )


if __name__ == "__main__":
    main()
