"""`up`'s workers follow the active model and the runs (real child processes, no database)."""

from __future__ import annotations

import sys
import time

from listing_vision.fleet import WorkerFleet, worker_plan
from listing_vision.supervisor import Child

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_the_active_model_runs_on_every_gpu_and_each_run_model_once() -> None:
    plan = worker_plan("clip", {"clip", "dino-large"}, ["0", "1"])

    assert sorted(plan) == ["worker-clip-gpu0", "worker-clip-gpu1", "worker-dino-large"]
    assert plan["worker-clip-gpu1"][-4:] == ["--model", "clip", "--gpu", "1"]
    assert plan["worker-dino-large"][-4:] == ["--model", "dino-large", "--gpu", "0"]


def test_without_a_gpu_one_cpu_worker_per_model() -> None:
    plan = worker_plan("clip", {"siglip"}, [])

    assert sorted(plan) == ["worker-clip", "worker-siglip"]
    assert "--gpu" not in plan["worker-siglip"]


def test_the_fleet_starts_new_workers_and_retires_unneeded_ones() -> None:
    wanted = {"worker-a": SLEEPER, "worker-b": SLEEPER}
    fleet = WorkerFleet(lambda: dict(wanted), lambda name, argv: Child(name, argv, {}), 10)
    try:
        fleet.converge()
        first_b = fleet.children["worker-b"].process
        del wanted["worker-b"]
        wanted["worker-c"] = SLEEPER
        fleet.converge()

        assert sorted(fleet.children) == ["worker-a", "worker-c"]
        assert first_b is not None and first_b.wait(10) is not None  # terminated (SIGTERM)
        fleet.converge()
        assert fleet.retiring == []
        assert len(fleet.all()) == 2
    finally:
        for child in fleet.all():
            if child.process is not None:
                child.process.kill()


def test_a_plan_that_cannot_be_read_keeps_the_workers_running() -> None:
    calls = {"n": 0}

    def plan() -> dict[str, list[str]]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("database restarting")
        return {"worker-a": SLEEPER}

    fleet = WorkerFleet(plan, lambda name, argv: Child(name, argv, {}), 10)
    try:
        fleet.converge()
        fleet.converge()
        time.sleep(0.1)
        process = fleet.children["worker-a"].process
        assert process is not None and process.poll() is None
    finally:
        for child in fleet.all():
            if child.process is not None:
                child.process.kill()
