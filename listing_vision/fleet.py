"""The workers `up` keeps running: one per GPU for the active model, and one for each model a
pending or running run needs (a reindex's target), converging as runs start and end and as a
reindex switches the active model."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from contract.settings import Settings
from db.engine import make_sessions
from db.registered_models import active_model_id
from db.runs import active_runs
from listing_vision.supervisor import Child

log = logging.getLogger(__name__)
Plan = dict[str, list[str]]  # child name -> its argv


def worker_plan(active: str, run_models: set[str], gpus: list[str]) -> Plan:
    """The workers to run: the active model on every visible GPU (or one on the CPU), and one
    for each other model a run needs (on the first GPU, beside the active model's)."""
    base = [sys.executable, "-m", "listing_vision", "worker", "--model"]
    plan: Plan = {}
    if gpus:
        for gpu in gpus:
            plan[f"worker-{active}-gpu{gpu}"] = [*base, active, "--gpu", gpu]
    else:
        plan[f"worker-{active}"] = [*base, active]
    for model in sorted(run_models - {active}):
        plan[f"worker-{model}"] = [*base, model, *(["--gpu", gpus[0]] if gpus else [])]
    return plan


def models_needed(engine: Engine, settings: Settings) -> tuple[str, set[str]]:
    """The active model, and the models of pending or running runs."""
    active = active_model_id(engine, settings.model)
    with make_sessions(engine)() as session:
        return active, {run.model_id for run in active_runs(session)}


@dataclass
class WorkerFleet:
    """Starts the planned workers and retires the ones no longer planned (a warm shutdown:
    SIGTERM, then SIGKILL after `stop_timeout`). The supervisor restarts a planned worker that
    dies, as it does every child."""

    plan: Callable[[], Plan]
    make_child: Callable[[str, list[str]], Child]
    stop_timeout: float
    children: dict[str, Child] = field(default_factory=dict)
    retiring: list[tuple[Child, float]] = field(default_factory=list)  # (child, kill after)

    def converge(self) -> None:
        """One step towards the plan; a plan that cannot be read now changes nothing."""
        try:
            wanted = self.plan()
        except Exception as error:  # the database restarting: try again on the next step
            log.warning("cannot read which workers are needed now: %s", error)
            return
        for name in sorted(set(self.children) - set(wanted)):
            log.info("%s is no longer needed: stopping it", name)
            child = self.children.pop(name)
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
                self.retiring.append((child, time.monotonic() + self.stop_timeout))
        for name in sorted(set(wanted) - set(self.children)):
            child = self.make_child(name, wanted[name])
            child.start()
            self.children[name] = child
        self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        still = []
        for child, deadline in self.retiring:
            process = child.process
            if process is None or process.poll() is not None:
                continue
            if now > deadline:
                process.kill()
            still.append((child, deadline))
        self.retiring = still

    def planned(self) -> list[Child]:
        """The workers the plan wants (restarted by the supervisor when they die)."""
        return list(self.children.values())

    def all(self) -> list[Child]:
        """Every worker still running, retiring ones included (for the final stop)."""
        return [*self.children.values(), *(child for child, _ in self.retiring)]
