"""Ends a worker process whose model call hangs, so its jobs are delivered again elsewhere."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
STALL_EXIT_CODE = 70


def start_stall_watchdog(busy_for: Callable[[], float], limit: float) -> threading.Event:
    """A model call stuck past `limit` seconds cannot be interrupted from Python (a CUDA call
    holds the thread): exit, so the unacknowledged jobs are delivered again and a supervisor
    starts a fresh process. Set the returned event to stop watching."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(min(5.0, limit / 4)):
            stuck = busy_for()
            if stuck > limit:
                log.critical("model call stuck for %.0fs (limit %.0fs): exiting", stuck, limit)
                logging.shutdown()
                os._exit(STALL_EXIT_CODE)

    threading.Thread(target=watch, name="stall-watchdog", daemon=True).start()
    return stop
