"""`LV_POOL_FETCHES`: processes that fetch a job's images and decode them, each process many
images at once, so the fetch's Python (httpx, h11, TLS, the address guard) and the decode's run
beside the worker's GIL instead of under it.

A process of the decode pool runs one task at a time, and a task ends with its slowest image:
there, one slow host held the images queued behind it for up to `LV_FETCH_TIMEOUT` (a hostile
run took five times as long as the worker's threads). Here every request has a thread of its
own in the process (`worker.fetch_child`) and its answer comes back the moment it is ready, over
a pipe a reader thread drains; a slow host holds only its own requests, as with the threads.

A process that dies (a decoder crash on a hostile file, the OOM killer) or has run one step of a
request (its fetch, or its decode) past the fetch timeout plus the decode's (stuck: killed) ends
its requests in flight. Those that had not begun go to its successor; those that had (suspects)
are fetched again by the worker's threads and left undecoded, so the job decodes them in the
decode pool, which finds the image that kills or hangs a process and fails it alone
(`worker.decode_pool`). Its processes die with the worker, however it ends (the parent-death
signal, `worker.spawner`)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from contract.errors import TransientError
from worker.decode_child import DecodeWork, decode_for_model
from worker.fetch import FetchPolicy
from worker.fetch_child import THREADS, Board, Requests, serve
from worker.image_fetch import FailedImage, Fetched, ImageRequest, fetch_one
from worker.spawner import on_spawner

log = logging.getLogger(__name__)
_START_TIMEOUT = 60.0  # a spawned process imports Pillow, numpy and httpx before it is ready
_CHECK_SECONDS = 5.0  # how often a wait looks for a process stuck past its time
_REFETCH_THREADS = 16
_DEADLINE_GRACE = 10.0  # past the attempt's deadline, for a decode under way to answer
_ROUNDS = 3  # sends of a request whose process ended before it began, before it is fetched here


class _Ended(Exception):
    """The process ended (died, or was killed as stuck) with the request in flight; `begun`:
    whether the request was running then (a suspect) or only waiting (innocent)."""

    def __init__(self, begun: bool) -> None:
        super().__init__("the fetch process ended")
        self.begun = begun


class _PastDeadline(Exception):
    """The attempt's deadline passed and the request's process has not answered."""


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
        self._stopped: Future[None] = Future()  # done once closed: ends a wait at once
        self._ids = itertools.count(1)
        self._turn = itertools.count()
        self._refetch = ThreadPoolExecutor(_REFETCH_THREADS, thread_name_prefix="refetch")
        self._starting: dict[int, Future[_Child]] = {}
        self.restarted = 0  # processes started again after one ended (for tests and the log)
        self.refetched = 0  # images fetched again by the worker's threads (for tests)
        self._children: list[_Child] = []
        try:
            for _ in range(max(1, processes)):
                self._children.append(on_spawner(self._start).result())
        except BaseException:
            self.close()
            raise

    def fetch_many(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[Fetched | TransientError]:
        """A group's images fetched and decoded, in the order asked: each fetched with its
        pixels (or why it cannot be used; a JPEG for the device still encoded), unchanged,
        failed, or transiently failed (the job is retried)."""
        limit = policy.timeout + self._decode_timeout
        out: dict[int, Fetched | TransientError] = {}
        todo = list(range(len(requests)))
        suspects: list[int] = []  # running when their process ended
        for round_ in range(_ROUNDS):
            if not todo:
                break
            sent = self._send([requests[i] for i in todo], policy, deadline)
            waiting: list[int] = []  # their process ended before they began
            for index, (child, future) in zip(todo, sent, strict=True):
                try:
                    got = child.wait(future, limit, self._stopped, deadline)
                except _PastDeadline:
                    got = TransientError(
                        f"image {requests[index].position} not fetched: its fetch process did"
                        " not answer before the attempt's LV_TASK_TIME_LIMIT"
                    )
                except _Ended as ended:
                    (suspects if ended.begun or round_ == _ROUNDS - 1 else waiting).append(index)
                    continue
                except TransientError as error:  # the worker is stopping
                    got = error
                if isinstance(got, str):  # why it cannot be used
                    request = requests[index]
                    got = FailedImage(request.position, request.url, got)
                out[index] = got  # type: ignore[assignment]
            todo = waiting
        if suspects:
            refetched = self._fetch_here([requests[i] for i in suspects], policy, deadline)
            out.update(zip(suspects, refetched, strict=True))
        return [out[index] for index in range(len(requests))]

    def close(self) -> None:
        """Stop the processes: requests in flight, and any asked after this, get a transient
        error (their jobs are retried); nothing waits for a slow host."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        with contextlib.suppress(Exception):
            self._stopped.set_result(None)
        for child in children:
            child.end(lambda _: _stopping())
            child.kill()
        self._refetch.shutdown(wait=False, cancel_futures=True)

    def _send(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[tuple[_Child, Future[object]]]:
        """Each request to a process (in turn, one message per process), with the future its
        answer will complete."""
        count = len(self._children)
        first = next(self._turn)
        places = [(first + offset) % count for offset in range(len(requests))]
        children = {place: self._child(place) for place in dict.fromkeys(places)}
        mine: dict[int, list[tuple[int, ImageRequest]]] = {}
        sent: list[tuple[_Child, Future[object]]] = []
        for place, request in zip(places, requests, strict=True):
            request_id = next(self._ids)
            mine.setdefault(place, []).append((request_id, request))
            sent.append((children[place], children[place].expect(request_id)))
        for place, items in mine.items():
            children[place].send((items, policy, deadline))
        return sent

    def _fetch_here(
        self, requests: Sequence[ImageRequest], policy: FetchPolicy, deadline: float | None
    ) -> list[Fetched | TransientError]:
        """Images their process was on when it ended, fetched again by the worker's threads
        and left undecoded: the job decodes them in the decode pool, which isolates the one
        that kills (or hangs) a process."""
        with self._lock:
            self.refetched += len(requests)
        try:
            futures = [self._refetch.submit(fetch_one, r, policy, deadline) for r in requests]
        except RuntimeError as error:  # shut down: the worker is stopping
            raise _stopping() from error
        got: list[Fetched | TransientError] = []
        for future in futures:
            self._until_stopped(future)
            if not future.done() or future.cancelled():
                raise _stopping()
            got.append(future.result())
        return got

    def _until_stopped(self, future: Future[Any]) -> None:
        """Wait for `future`, or for the close, whichever comes first."""
        both: list[Future[Any]] = [future, self._stopped]
        wait(both, return_when=FIRST_COMPLETED)

    def _child(self, place: int) -> _Child:
        """The process at `place`, started again (on the spawner thread, outside the lock: a
        start takes a second or more) if it has ended."""
        with self._lock:
            if self._closed:
                raise _stopping()
            child = self._children[place]
            if child.ended is None:
                return child
            starting = self._starting.get(place)
            if starting is None:
                log.warning("a fetch process ended; starting another")
                starting = self._starting[place] = on_spawner(self._start)
        self._until_stopped(starting)
        with self._lock:
            if self._starting.get(place) is starting and starting.done():
                del self._starting[place]
                if starting.exception() is None:
                    self._children[place] = starting.result()
                    self.restarted += 1
            if self._closed:
                if starting.done() and starting.exception() is None:
                    starting.result().kill()
                raise _stopping()
        return starting.result()  # its TransientError if it could not start

    def _start(self) -> _Child:
        board = Board(
            self._context.Array("d", THREADS, lock=False),
            self._context.Array("q", THREADS, lock=False),
        )
        mine, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve,
            args=(theirs, os.getpid(), board, self._work, self._decode_args),
            name="lv-fetch",
            daemon=True,
        )
        try:
            process.start()
            theirs.close()
            ready_by = time.monotonic() + _START_TIMEOUT
            while not mine.poll(0.1):
                if self._closed or time.monotonic() > ready_by or not process.is_alive():
                    raise TimeoutError(f"not ready (exit code {process.exitcode})")
            mine.recv()
            if self._closed:
                raise TimeoutError("closed while it started")
        except (OSError, EOFError, TimeoutError) as error:  # no memory to start one
            with contextlib.suppress(Exception):
                process.kill()
            mine.close()
            raise TransientError(f"cannot start a fetch process: {error}") from error
        return _Child(process, mine, board)


class _Child:
    """One fetch process: its pipe, the requests it has in flight, a writer thread that sends
    (so no caller blocks on a full pipe) and a reader thread that completes each request as
    its answer arrives."""

    def __init__(self, process: BaseProcess, conn: Connection, board: Board) -> None:
        self.process = process
        self._conn = conn
        self._board = board
        self._lock = threading.Lock()  # `_pending` and `ended`; never held across I/O
        self._pending: dict[int, Future[object]] = {}
        self.ended: bool | None = None
        self._outbox: queue.SimpleQueue[Requests | None] = queue.SimpleQueue()
        self._writing_since = 0.0  # when the message being sent began (0: none)
        threading.Thread(target=self._write, name="fetch-requests", daemon=True).start()
        threading.Thread(target=self._read, name="fetch-answers", daemon=True).start()

    def expect(self, request_id: int) -> Future[object]:
        future: Future[object] = Future()
        with self._lock:
            ended = self.ended is not None
            if not ended:
                self._pending[request_id] = future
        if ended:
            future.set_exception(_Ended(False))
        return future

    def send(self, message: Requests) -> None:
        self._outbox.put(message)

    def wait(
        self, future: Future[object], limit: float, stopped: Future[None], deadline: float | None
    ) -> object:
        """The request's answer; `_Ended` if the process ends first. A process is stuck, and
        killed, when it has run one step of a request longer than `limit`, has not read a
        message for that long, or has been idle through two checks while the request waited
        (it reads nothing: a healthy one answers or begins within the moment). Past the
        attempt's `deadline` (with a grace for a decode under way) the request is given up,
        transiently: the process may be fine, the attempt is not (`_PastDeadline`)."""
        idle_checks = 0
        while True:
            try:
                return future.result(timeout=_CHECK_SECONDS)
            except FutureTimeout:
                if stopped.done():
                    raise _stopping() from None
                now, writing = time.monotonic(), self._writing_since
                idle_checks = idle_checks + 1 if self._board.idle() else 0
                if self._board.stuck(limit) or 0 < writing < now - limit or idle_checks >= 2:
                    log.warning("a fetch process is stuck (past %.0f s, or frozen); killing", limit)
                    self.kill()
                elif deadline is not None and now > deadline + _DEADLINE_GRACE:
                    raise _PastDeadline() from None

    def end(self, reason: object = None) -> None:
        """Fail every request in flight: with `reason(request_id)` when given, else `_Ended`
        saying whether it had begun. A fresh exception for each: one shared would gather
        every raiser's traceback (and the frames it holds)."""
        with self._lock:
            self.ended = True
            pending, self._pending = self._pending, {}
        begun = self._board.begun() if reason is None else set()
        for request_id, future in pending.items():
            error = reason(request_id) if callable(reason) else _Ended(request_id in begun)
            with contextlib.suppress(Exception):  # completed meanwhile
                future.set_exception(error)
        self._outbox.put(None)  # the writer stops

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            self._writing_since = time.monotonic()
            try:
                self._conn.send(message)
            except Exception:  # it died (or the kill of a stuck one broke the pipe)
                self.kill()
                return
            finally:
                self._writing_since = 0.0

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
        self.kill()  # already dead, or alive with a pipe it can no longer use
        with contextlib.suppress(Exception):
            self.process.join(timeout=5)
        self.end()
        with contextlib.suppress(Exception):
            self._conn.close()


def _stopping() -> TransientError:
    return TransientError("the worker is stopping: its fetch processes are gone")
