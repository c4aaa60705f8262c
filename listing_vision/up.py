"""`listing-vision up`: the whole stack in the foreground, supervised.

Beat, Flower and the exporter run for the stack's lifetime; the workers follow the database:
the active model on every visible GPU (or the CPU), plus one for the model of each pending or
running run. Each child writes to its own file in `LV_HOME/logs` (`worker-MODEL[-gpuN].log`,
`beat.log`, `flower.log`, `exporter.log`), and `up` itself to `up.log` there as well as its
console.
"""

from __future__ import annotations

import logging

from contract.settings import Settings
from db.engine import make_engine
from listing_vision.fleet import WorkerFleet, models_needed, worker_plan
from listing_vision.log_format import log_to_file
from listing_vision.supervisor import (
    Child,
    banner,
    beat_child,
    console_copy,
    exporter_child,
    flower_child,
    log_dir,
    supervise,
    visible_gpus,
    worker_env,
    worker_stop_timeout,
)


def run_stack(resolved: Settings) -> int:
    """Start the stack and keep it up until Ctrl-C/SIGTERM; returns the exit status."""
    engine = make_engine(resolved.require_database_url(), application_name="listing-vision-up")
    gpus = visible_gpus()
    env = worker_env(resolved)

    def plan() -> dict[str, list[str]]:
        active, run_models = models_needed(engine, resolved)
        return worker_plan(active, run_models, gpus)

    stop_after = worker_stop_timeout(resolved)
    logs = log_dir(resolved)
    fleet = WorkerFleet(
        plan, lambda name, argv: Child(name, argv, env, logs / f"{name}.log"), stop_after
    )
    active, _ = models_needed(engine, resolved)
    up_log = log_to_file(logs / "up.log")
    console_copy.addHandler(up_log)
    try:
        children = [beat_child(resolved), flower_child(resolved), exporter_child(resolved)]
        return supervise(
            children,
            fleet,
            banner=banner(resolved, active),
            worker_timeout=stop_after,
        )
    finally:
        engine.dispose()
        logging.getLogger().removeHandler(up_log)
        console_copy.removeHandler(up_log)
        up_log.close()
