"""`LV_POOL_FETCHES`: processes that fetch a job's images and decode them, each process many
images at once, so the fetch's Python (httpx, h11, TLS, the address guard) and the decode's run
beside the worker's GIL instead of under it.

A process of the decode pool runs one task at a time, and a task ends with its slowest image:
there, one slow host held the images queued behind it for up to `LV_FETCH_TIMEOUT` (a hostile
run took five times as long as the worker's threads). Here every request has a thread of its
own in the process (`worker.fetch_child`) and its answer comes back the moment it is ready, over
a pipe a reader thread drains; a slow host holds only its own requests, as with the threads.

A process that dies (a decoder crash on a hostile file, the OOM killer) or has run one request
past the fetch timeout plus the decode's (stuck: killed) ends its requests in flight; those
images are fetched again by the worker's threads and left undecoded, so the job decodes them in
the decode pool, which finds the image that kills or hangs a process and fails it alone
(`worker.decode_pool`). The process is started again for the next request. Its processes die
with the worker, however it ends (the parent-death signal)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from contract.errors import TransientError
from worker.decode_child import DecodeWork, decode_for_model
from worker.fetch import FetchPolicy
from worker.fetch_child import THREADS, serve
from worker.image_fetch import FailedImage, Fetched, ImageRequest, fetch_one

log = logging.getLogger(__name__)
_START_TIMEOUT = 60.0  # a spawned process imports Pillow, numpy and httpx before it is ready
_STUCK_CHECK_SECONDS = 5.0  # how often a wait looks for a request stuck past its time
_REFETCH_THREADS = 16


class _Ended(Exception):
    """The process ended (died, or was killed as stuck) with the request in flight."""


class FetchProcesses:
    """From any thread: `fetch_many(requests, policy, deadline)` (`worker.image_fetch`'s
    `FetchMany`), each image fetched and decoded in one of `processes` processes."""

    def __init__(
        self,
        processes: int,
        *,
        max_pixels: int,
        draft_size: int,
        side: int,
        keep_jpegs: bool = False,
        decode_timeout: float = 120.0,
        work: DecodeWork = decode_for_model,
    ) -> None:
        self._decode_args = (max_pixels, draft_size, side, keep_jpegs)
        self._decode_timeout = decode_timeout
        self._work = work
        # Spawned, not forked: the worker has threads (and maybe CUDA) a fork would copy
        # half-way.
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self._refetch = ThreadPoolExecutor(_REFETCH_THREADS, thread_name_prefix="refetch")
        self.restarted = 0  # processes started again after one ended (for tests and the log)
        self.refetched = 0  # images fetched again by the worker's threads (for tests)
        self._children = [self._start() for _ in range(max(1, processes))]

    def fetch_many(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[Fetched | TransientError]:
        """A group's images fetched and decoded, in the order asked: each fetched with its
        pixels (or why it cannot be used; a JPEG for the device still encoded), unchanged,
        failed, or transiently failed (the job is retried)."""
        if not requests:
            return []
        limit = policy.timeout + self._decode_timeout
        sent = self._send(requests, policy, deadline)
        out: dict[int, Fetched | TransientError] = {}
        again: list[int] = []  # in flight when their process ended
        for index, (request, (child, future)) in enumerate(zip(requests, sent, strict=True)):
            try:
                got = child.wait(future, limit)
            except _Ended:
                again.append(index)
                continue
            except TransientError as error:  # the worker is stopping
                got = error
            if isinstance(got, str):  # why it cannot be used
                got = FailedImage(request.position, request.url, got)
            out[index] = got  # type: ignore[assignment]
        if again:
            refetched = self._fetch_here([requests[i] for i in again], policy, deadline)
            out.update(zip(again, refetched, strict=True))
        return [out[index] for index in range(len(requests))]

    def close(self) -> None:
        """Stop the processes: requests in flight, and any asked after this, get a transient
        error (their jobs are retried); nothing waits for a slow host."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            child.end(_stopping())
            child.kill()
        self._refetch.shutdown(wait=False, cancel_futures=True)

    def _send(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[tuple[_Child, Future[object]]]:
        """Each request to a process (in turn, one message per process), with the future its
        answer will complete."""
        count = len(self._children)
        first = next(self._turn)
        mine: dict[int, list[tuple[int, ImageRequest]]] = {}
        sent: list[tuple[_Child, Future[object]]] = []
        children = {}
        for offset, request in enumerate(requests):
            place = (first + offset) % count
            if place not in children:
                children[place] = self._child(place)
            request_id = next(self._ids)
            mine.setdefault(place, []).append((request_id, request))
            sent.append((children[place], children[place].expect(request_id)))
        for place, items in mine.items():
            children[place].send((items, policy, deadline))
        return sent

    def _fetch_here(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[Fetched | TransientError]:
        """Images whose process ended with them in flight, fetched by the worker's threads and
        left undecoded: the job decodes them in the decode pool, which isolates the one that
        kills (or hangs) a process."""
        self.refetched += len(requests)
        try:
            return list(self._refetch.map(lambda r: fetch_one(r, policy, deadline), requests))
        except RuntimeError as error:  # shut down: the worker is stopping
            raise _stopping() from error

    def _child(self, place: int) -> _Child:
        """The process at `place`, started again if it has ended."""
        with self._lock:
            if self._closed:
                raise _stopping()
            child = self._children[place]
            if child.ended is not None:
                log.warning("a fetch process ended; starting another")
                child = self._children[place] = self._start()
                self.restarted += 1
            return child

    def _start(self) -> _Child:
        began = self._context.Array("d", THREADS, lock=False)
        mine, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve,
            args=(theirs, os.getpid(), began, self._work, self._decode_args),
            name="lv-fetch",
            daemon=True,
        )
        try:
            process.start()
            theirs.close()
            if not mine.poll(_START_TIMEOUT):
                raise TimeoutError(f"not ready in {_START_TIMEOUT:.0f} s")
            mine.recv()
        except (OSError, EOFError, TimeoutError) as error:  # no memory to start one
            with contextlib.suppress(Exception):
                process.kill()
            raise TransientError(f"cannot start a fetch process: {error}") from error
        return _Child(process, mine, began)


class _Child:
    """One fetch process: its pipe, the requests it has in flight, and a reader thread that
    completes each as its answer arrives."""

    def __init__(self, process: BaseProcess, conn: Connection, began: Any) -> None:
        self.process = process
        self._conn = conn
        self._began = began
        self._lock = threading.Lock()  # the pipe's sending end and `_pending`
        self._pending: dict[int, Future[object]] = {}
        self.ended: Exception | None = None
        threading.Thread(target=self._read, name="fetch-answers", daemon=True).start()

    def expect(self, request_id: int) -> Future[object]:
        future: Future[object] = Future()
        with self._lock:
            if self.ended is not None:
                future.set_exception(self.ended)
            else:
                self._pending[request_id] = future
        return future

    def send(self, message: object) -> None:
        with self._lock:
            if self.ended is not None:
                return  # its futures have their exception already
            try:
                self._conn.send(message)
                return
            except (OSError, ValueError):  # it died a moment ago
                pass
        self.end(_Ended())

    def wait(self, future: Future[object], limit: float) -> object:
        """The request's answer; `_Ended` if the process ends first. One that has run a
        request longer than `limit` is stuck and killed (a request that waits for one of its
        threads has not begun, so a slow host's queue is not mistaken for a hang)."""
        while True:
            try:
                return future.result(timeout=_STUCK_CHECK_SECONDS)
            except FutureTimeout:
                now = time.monotonic()
                if any(0 < began < now - limit for began in self._began[:]):
                    log.warning("a fetch process ran one image past %.0f s; killing it", limit)
                    self.kill()

    def end(self, error: Exception) -> None:
        """Fail every request in flight with `error` (the first reason to end wins)."""
        with self._lock:
            if self.ended is None:
                self.ended = error
            pending, self._pending = self._pending, {}
            reason = self.ended
        for future in pending.values():
            future.set_exception(reason)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()

    def _read(self) -> None:
        while True:
            try:
                request_id, got = self._conn.recv()
            except Exception:  # EOF: the process ended (or its answer could not be read)
                break
            with self._lock:
                future = self._pending.pop(request_id, None)
            if future is not None:
                future.set_result(got)
        self.end(_Ended())
        with contextlib.suppress(Exception):
            self.process.join(timeout=5)
            self._conn.close()


def _stopping() -> TransientError:
    return TransientError("the worker is stopping: its fetch processes are gone")
