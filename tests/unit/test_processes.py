"""Process bookkeeping: which GPUs `up` uses, and which registered users of the embedded
servers are still alive (a reused pid is not)."""

from __future__ import annotations

import os

import psutil
import pytest

from listing_vision.embedded import _live
from listing_vision.supervisor import visible_gpus


@pytest.mark.parametrize(
    ("visible", "expected"), [("2,3", ["2", "3"]), ("", []), ("GPU-1a2b", ["GPU-1a2b"])]
)
def test_up_starts_one_worker_per_visible_gpu(
    monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == expected


def test_a_registered_pid_counts_only_while_it_is_the_same_process() -> None:
    me = [os.getpid(), psutil.Process().create_time()]
    reused = [os.getpid(), psutil.Process().create_time() - 1000.0]  # same pid, another process
    gone = [2**22 + 7, 0.0]
    assert _live([me, reused, gone, 1234]) == [me]


def test_up_gives_a_stopping_worker_time_for_its_longest_attempt() -> None:
    """Issue 14 #10: killed at 90 s while a legitimate attempt runs longer, its job would wait
    a whole visibility timeout."""
    from contract.settings import load_settings
    from listing_vision.supervisor import WORKER_STOP_TIMEOUT, worker_stop_timeout

    long_attempts = load_settings(task_time_limit=600, visibility_timeout=3600, fetch_timeout=15)
    assert worker_stop_timeout(long_attempts) >= 600 + 15
    short = load_settings(task_time_limit=10, visibility_timeout=60)
    assert worker_stop_timeout(short) == WORKER_STOP_TIMEOUT


@pytest.mark.parametrize("essential", [True, False])
def test_a_child_that_keeps_exiting_stops_the_stack_only_if_essential(essential: bool) -> None:
    """The exporter is inessential: metrics must never take the processing down."""
    import sys
    import time

    from listing_vision.supervisor import RESTART_LIMIT, Child, _restart_dead

    argv = [sys.executable, "-c", "raise SystemExit(2)"]
    child = Child("exporter", argv, dict(os.environ), essential=essential)
    child.start()
    assert child.process is not None
    child.process.wait(30)
    child.deaths = [time.monotonic()] * (RESTART_LIMIT - 1)
    given_up = _restart_dead([child])
    assert (given_up is child) == essential
    assert (child.process is None) == (not essential)
    assert _restart_dead([child]) is (child if essential else None)  # and never started again
