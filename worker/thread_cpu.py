"""CPU time this process has spent, by kind of thread (Linux `/proc`; empty elsewhere).

A worker is many threads under one GIL plus the model's native threads; which of them use the
CPU says where the time per listing goes (Celery's consumer, fetch and decode, the model, the
writer). The bench reads it through `lv_stats` before and after a run (bench/throughput.py)."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from pathlib import Path

_TASKS = Path("/proc/self/task")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's unit of CPU time
_NUMBERED = re.compile(r"[-_]?\d+(_\d+)?$")  # "job-group-3", "ThreadPoolExecutor-1_0"
NATIVE = "native"  # threads Python did not start: torch's intra-op pool, library threads
CHILDREN = "child-processes"  # the processes this one started (the decode pool's)
_CHILDREN_SEEN: dict[int, float] = {}  # pid -> its CPU seconds when last read


def thread_kind(name: str) -> str:
    """A thread's name without its number: the threads of one pool count together."""
    return _NUMBERED.sub("", name) or name


def cpu_seconds_by_thread() -> dict[str, float]:
    """User plus system seconds of every live thread, summed by `thread_kind` (a thread that
    has ended no longer counts), and of the child processes (`CHILDREN`, as last read)."""
    if not _TASKS.is_dir():
        return {}
    names = {t.native_id: thread_kind(t.name) for t in threading.enumerate()}
    seconds: dict[str, float] = {}
    for task in _TASKS.iterdir():
        used = _cpu_seconds(task / "stat")
        if used is None:
            continue  # ended meanwhile
        kind = names.get(int(task.name), NATIVE)
        seconds[kind] = round(seconds.get(kind, 0.0) + used, 3)
    for child in multiprocessing.active_children():
        used = _cpu_seconds(Path(f"/proc/{child.pid}/stat"))
        if used is not None and child.pid is not None:
            _CHILDREN_SEEN[child.pid] = used
    if _CHILDREN_SEEN:  # ended children keep their last reading: the sum never goes back
        seconds[CHILDREN] = round(sum(_CHILDREN_SEEN.values()), 3)
    return seconds


def _cpu_seconds(stat: Path) -> float | None:
    """utime + stime of one thread or process, or None when it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK
