"""What a fetch process runs (`LV_POOL_FETCHES`): requests arrive over a pipe, each is fetched
(`worker.image_fetch.fetch_one`, the code the worker's threads run) and decoded
(`worker.decode_child`) in a thread of its own, and each answer goes back the moment it is
ready, so one slow host holds only its own requests. No torch here, as in `decode_child`."""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from contract.errors import TransientError, one_line
from worker.decode_child import DecodeWork, start
from worker.fetch import FetchPolicy
from worker.image_fetch import Fetched, FetchedBytes, ImageRequest, fetch_one

# Requests run at once in one process: they wait on the network, not the CPU. More wait for a
# thread, and a request that waits has not begun (`Board`).
THREADS = 64
# Decodes at once in one process: more would hold more pixels, not finish sooner under one GIL.
_DECODE_SLOTS = threading.BoundedSemaphore(2)
_JPEG_START = b"\xff\xd8\xff"

# One message from the worker: requests with their ids, the policy and the attempt's deadline.
Requests = tuple[list[tuple[int, ImageRequest]], FetchPolicy, float | None]


@dataclass(frozen=True)
class Board:
    """Shared arrays, one entry per thread of a fetch process, that the worker reads: since
    when the thread's current step (the fetch, or the decode once it has a slot) runs (0 when
    it waits or is idle), and which request it is on. Waiting for a thread or a decode slot
    is not being stuck; and when the process dies, only requests that had begun are suspects."""

    began: Any  # doubles: monotonic seconds
    ids: Any  # long longs: request ids

    def stuck(self, limit: float) -> bool:
        now = time.monotonic()
        return any(0 < began < now - limit for began in self.began[:])

    def idle(self) -> bool:
        """No thread is fetching or decoding: with a request in flight, a process that reads
        nothing (stopped, or frozen) looks so, a healthy one only for a moment."""
        return not any(began > 0 for began in self.began[:])

    def begun(self) -> set[int]:
        return {
            request_id
            for began, request_id in zip(self.began[:], self.ids[:], strict=True)
            if began > 0
        }


def serve(
    conn: Connection,
    parent: int,
    board: Board,
    work: DecodeWork,
    decode_args: tuple[int, int, int, bool],
) -> None:
    """A fetch process's life: say it is ready, then answer requests until the worker closes
    the pipe (or dies: the parent-death signal of `start`)."""
    start(parent)
    send_lock = threading.Lock()
    slots = itertools.count()
    local = threading.local()
    max_pixels, draft_size, side, keep_jpegs = decode_args

    def answer(request_id: int, request: ImageRequest, policy: FetchPolicy, deadline: Any) -> None:
        if not hasattr(local, "slot"):
            local.slot = next(slots)
        slot = local.slot
        board.ids[slot] = request_id
        try:
            board.began[slot] = time.monotonic()
            got: Fetched | TransientError | str = fetch_one(request, policy, deadline)
            if isinstance(got, FetchedBytes) and not (
                keep_jpegs and got.data.startswith(_JPEG_START)
            ):
                board.began[slot] = 0.0  # waiting for a decode slot is not being stuck
                with _DECODE_SLOTS:
                    board.began[slot] = time.monotonic()
                    decoded = work(got.data, got.sha256, max_pixels, draft_size, side)
                got = replace(got, data=b"", decoded=decoded)
        except Exception as error:  # a bug, or no memory: as in the worker's threads, retried
            got = TransientError(f"internal error in a fetch process: {one_line(error)}")
        finally:
            board.began[slot] = 0.0
        try:
            payload = bytes(ForkingPickler.dumps((request_id, got)))
        except Exception as error:  # its answer could not be pickled
            reason = f"could not fetch image: {one_line(error)}"
            payload = bytes(ForkingPickler.dumps((request_id, reason)))
        with send_lock:
            try:
                conn.send_bytes(payload)
            except OSError:  # the worker has gone
                os._exit(0)

    threads = ThreadPoolExecutor(THREADS, thread_name_prefix="fetch")
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message: Requests = conn.recv()
        except (EOFError, OSError):  # the worker closed the pipe: stop
            os._exit(0)
        requests, policy, deadline = message
        for request_id, request in requests:
            threads.submit(answer, request_id, request, policy, deadline)
