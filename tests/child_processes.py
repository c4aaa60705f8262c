"""Helpers for tests of the worker's helper processes (decode pool, fetch processes): whether a
process is still alive, and which of them outlive a worker that ends without clean-up."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gone_within(pids: Iterable[int], seconds: float = 10.0) -> bool:
    """Whether every process in `pids` has ended within `seconds`."""
    pids = list(pids)
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def started_by_a_worker_that_exits(module: str, start: str) -> list[int]:
    """The helper processes a Python process starts with the statement `start` (the names of
    `module` imported), right before it ends by `os._exit`, which skips every clean-up."""
    code = (
        f"import multiprocessing, os\nfrom {module} import *\n"
        "if __name__ == '__main__':\n"
        f"    {start}\n"
        "    print(' '.join(str(c.pid) for c in multiprocessing.active_children()), flush=True)\n"
        "    os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return [int(pid) for pid in out.stdout.split()]
