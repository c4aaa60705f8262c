"""CPU time this process has spent, by kind of thread (Linux `/proc`; empty elsewhere).

A worker is many threads under one GIL plus the model's native threads; which of them use the
CPU says where the time per listing goes (Celery's consumer, fetch and decode, the model, the
writer). The bench reads it through `lv_stats` before and after a run (bench/throughput.py)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_TASKS = Path("/proc/self/task")
_NUMBERED = re.compile(r"[-_]?\d+(_\d+)?$")  # "job-group-3", "ThreadPoolExecutor-1_0"
NATIVE = "native"  # threads Python did not start: torch's intra-op pool, library threads


def thread_kind(name: str) -> str:
    """A thread's name without its number: the threads of one pool count together."""
    return _NUMBERED.sub("", name) or name


def cpu_seconds_by_thread() -> dict[str, float]:
    """User plus system seconds of every live thread, summed by `thread_kind` (a thread that
    has ended no longer counts)."""
    if not _TASKS.is_dir():
        return {}
    names = {t.native_id: thread_kind(t.name) for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for task in _TASKS.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        kind = names.get(int(task.name), NATIVE)
        seconds[kind] = round(seconds.get(kind, 0.0) + used, 3)
    return seconds
