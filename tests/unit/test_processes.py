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
