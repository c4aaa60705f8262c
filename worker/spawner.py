"""One long-lived thread that starts the worker's helper processes (decode and fetch processes).

Linux's parent-death signal (`decode_child.start`) fires when the *thread* that started a
process ends, not the process: a process started from a job's short-lived thread would be
killed with that thread. Started from here, they die with the worker only."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

R = TypeVar("R")

_spawner: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def on_spawner(start: Callable[[], R]) -> Future[R]:
    """Run `start` (which starts processes) on the spawner thread."""
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="spawner")
        return _spawner.submit(start)
