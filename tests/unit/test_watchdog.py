"""A model call stuck past LV_TASK_TIME_LIMIT ends the worker process (SPEC.md, Settings)."""

from __future__ import annotations

import subprocess
import sys

from worker.watchdog import STALL_EXIT_CODE

PROGRAM = """
import sys, time
from worker.watchdog import start_stall_watchdog
stuck = float(sys.argv[1])
start_stall_watchdog(lambda: stuck, limit=0.4)
time.sleep(3)
print("still running")
"""


def _run(stuck_seconds: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, str(stuck_seconds)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_call_stuck_past_the_limit_ends_the_process_with_its_code() -> None:
    ended = _run(5.0)

    assert ended.returncode == STALL_EXIT_CODE, ended.stderr
    assert "still running" not in ended.stdout
    assert "model call stuck" in ended.stderr


def test_a_call_within_the_limit_leaves_the_process_alone() -> None:
    ended = _run(0.1)

    assert ended.returncode == 0, ended.stderr
    assert "still running" in ended.stdout
