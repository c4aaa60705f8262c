"""What a fetch process runs (`LV_POOL_FETCHES`): requests arrive over a pipe, each is fetched and
decoded in a thread of its own (`decode_child.fetch_and_decode_one`, the code the worker's
threads run), and each answer goes back the moment it is ready, so one slow host holds only
its own requests. No torch here, as in `decode_child`."""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from contract.errors import one_line
from worker.decode_child import DecodeWork, fetch_and_decode_one, start
from worker.fetch import FetchPolicy
from worker.image_fetch import ImageRequest

# Fetches at once in one process: they wait on the network, not the CPU. The parent sends no
# more than this many at a time, so a request's wait for a thread here is never mistaken for
# being stuck (`FetchProcesses`).
THREADS = 64

# One message from the worker: requests with their ids, the policy and the attempt's deadline.
Requests = tuple[list[tuple[int, ImageRequest]], FetchPolicy, float | None]


def serve(
    conn: Connection,
    parent: int,
    began: Any,
    work: DecodeWork,
    decode_args: tuple[int, int, int, bool],
) -> None:
    """A fetch process's life: say it is ready, then answer requests until the worker closes
    the pipe (or dies: the parent-death signal of `start`). `began`: a shared array, one entry
    per thread, of when its current request began (0 when idle), which the worker reads to
    tell a stuck request from a queued one."""
    start(parent)
    send_lock = threading.Lock()
    slots = itertools.count()
    local = threading.local()

    def answer(request_id: int, request: ImageRequest, policy: FetchPolicy, deadline: Any) -> None:
        if not hasattr(local, "slot"):
            local.slot = next(slots)
        began[local.slot] = time.monotonic()
        try:
            got: object = fetch_and_decode_one(work, request, policy, deadline, *decode_args)
        except Exception as error:  # a bug on odd input: this image only
            got = f"could not fetch image: {one_line(error)}"
        finally:
            began[local.slot] = 0.0
        with send_lock:
            try:
                conn.send((request_id, got))
            except (OSError, ValueError):  # the worker has gone
                os._exit(0)
            except Exception as error:  # its answer could not be pickled
                conn.send((request_id, f"could not fetch image: {one_line(error)}"))

    threads = ThreadPoolExecutor(THREADS, thread_name_prefix="fetch")
    with send_lock:
        conn.send(("ready", os.getpid()))
    while True:
        try:
            message: Requests = conn.recv()
        except (EOFError, OSError):  # the worker closed the pipe: stop
            os._exit(0)
        requests, policy, deadline = message
        for request_id, request in requests:
            threads.submit(answer, request_id, request, policy, deadline)
