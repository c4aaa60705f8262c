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
