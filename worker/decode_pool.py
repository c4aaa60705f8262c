"""Decode in a pool of processes (`LV_DECODE_PROCESSES`), so that the Python around Pillow's
decoder (the blur measure's numpy, the pixel layout, the buffers) runs beside the worker's GIL
instead of under it (`worker.fetch_processes` fetches there too, with `LV_POOL_FETCHES`).

Measured on the development machine (docs/architecture.md): one image's fetch-to-pixels path
took the same time per image in one thread as in two, because all but the decoder itself holds
the GIL. A pool process receives an image's bytes and returns its facts and uint8 pixels
(`worker.decode_child`, the functions the threads run when there is no pool), for the tensor
input path only: its pixels are plain arrays, while the PIL path's are each model's own
transform.

A process that dies (a decoder crash on a hostile file, the kernel's OOM killer) or hangs
(killed once it has run one task past `timeout`) breaks the pool for every chunk in it at that
moment: the pool is replaced, chunks that never reached a process go to the new one whole, and
each chunk a process had begun is run again one image at a time in a process of its own, so
the shared pool breaks once per bad image and only the image that kills (or hangs) a
process alone fails ("the decoder process died on this image"); the worker lives on. The pool's
processes die with the worker, however it ends (Linux: the parent-death signal).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from contract.errors import TransientError, one_line
from worker.decode_child import (
    DecodedForModel,
    DecodeWork,
    decode_each,
    decode_for_model,
    decode_one,
    ready,
    start,
    timed,
)
from worker.image_fetch import FailedImage, FetchedBytes
from worker.images import PreparedImage, prepared_from
from worker.spawner import on_spawner

log = logging.getLogger(__name__)
# A spawned process imports the decoder's modules before its first task: on a loaded host that
# took longer than a short decode timeout, which is about decoding, not starting.
_START_TIMEOUT = 60.0
CHUNK = 16  # images per task at most: bounds the pixels held in one message, and a timeout
_STUCK_CHECK_SECONDS = 5.0  # how often a wait looks for a process stuck past the timeout

R = TypeVar("R")


@dataclass(frozen=True)
class _Work(Generic[R]):
    """What a call runs in the pool: `each(chunk, *args)` per task, `one(item, *args)` for an
    item run alone; `timeout` for one task; `doing` names it in a failure."""

    each: Callable[..., Sequence[R]]
    one: Callable[..., R]
    args: tuple[Any, ...]
    timeout: float
    doing: str


class DecodePool:
    """From any thread: `prepare_many(images)` decodes fetched images in the pool's processes,
    each as a `PreparedImage` (uint8 (3, H, W) pixels) or a `FailedImage` with its reason."""

    def __init__(
        self,
        processes: int,
        *,
        max_pixels: int,
        draft_size: int,
        side: int,
        timeout: float = 120.0,
        work: DecodeWork = decode_for_model,
    ) -> None:
        self.processes = max(1, processes)
        self._args = (max_pixels, draft_size, side)
        self._timeout = timeout
        self._work = work
        # Spawned, not forked: the worker has threads (and maybe CUDA) a fork would copy
        # half-way; the children import Pillow and numpy only.
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._alone = threading.BoundedSemaphore(self.processes)  # private pools at once
        self._closed = False
        self._pool = self._new_pool(self.processes)
        self.replaced = 0  # pools replaced after a process died (for tests and the log)
        self.run_alone = 0  # items run one at a time in a private process (for tests)
        self._task_ids = itertools.count(1)

    def prepare_many(self, images: Sequence[FetchedBytes]) -> list[PreparedImage | FailedImage]:
        """A group's fetched images decoded in a few tasks (up to `CHUNK` images each): a
        task's own cost (its hand-off, a wake-up of the pool's result thread) is paid per
        chunk, not per image."""
        work: _Work[DecodedForModel | str] = _Work(
            partial(decode_each, self._work),
            partial(decode_one, self._work),
            self._args,
            self._timeout,
            "decoding",
        )
        got = self._in_chunks(work, [(image.data, image.sha256) for image in images])
        return [prepared_from(image, one) for image, one in zip(images, got, strict=True)]

    def _in_chunks(self, work: _Work[R], items: Sequence[Any]) -> list[R | str]:
        """`work.each(chunk, *work.args)` over chunks of `items` in the shared pool; a chunk
        that broke (or hung) it is run again item by item (`work.one(item, *work.args)`) in
        private processes. A string is an item's reason for failing."""
        if not items:
            return []
        size = min(CHUNK, -(-len(items) // self.processes))
        chunks = [list(items[start : start + size]) for start in range(0, len(items), size)]
        pool = self._pool
        ids = [next(self._task_ids) for _ in chunks]
        futures: list[Future[Sequence[R]]] = []
        for task_id, chunk in zip(ids, chunks, strict=True):
            try:
                futures.append(pool.submit(task_id, work.each, chunk, *work.args))
            except BrokenProcessPool:  # broken meanwhile, perhaps by a chunk just submitted
                break
            except RuntimeError as error:  # shut down: the worker is stopping
                raise _stopping() from error
        got: list[R | str] = []
        for task_id, chunk, future in zip(ids, chunks, futures, strict=False):
            try:
                done = pool.result(future, work.timeout)
                got.extend(done)
                continue
            except CancelledError as error:  # queued when the pool was closed
                raise _stopping() from error
            except BrokenProcessPool:  # a process died, perhaps of an image in this chunk
                self._replace(pool)
            except FutureTimeout:  # a process is stuck, perhaps on an image in this chunk
                pool.kill()
                self._replace(pool)
            except Exception as error:  # e.g. no memory to send the chunk's pixels back
                log.warning("a pool task failed (%s); running its images one by one", error)
                alone = self._one_by_one(work, chunk)
                got.extend(alone)
                continue
            if pool.started(task_id):  # it may hold the image that broke the pool
                again = self._one_by_one(work, chunk)
            else:  # it never reached a process: innocent, into the new pool whole
                again = self._in_chunks(work, chunk)
            got.extend(again)
        if len(futures) < len(chunks):  # never submitted: innocent, into the new pool whole
            self._replace(pool)
            rest = self._in_chunks(
                work, [item for chunk in chunks[len(futures) :] for item in chunk]
            )
            got.extend(rest)
        return got

    def _one_by_one(self, work: _Work[R], items: Sequence[Any]) -> list[R | str]:
        """Items of a chunk that broke (or hung) the shared pool, run one at a time in a
        process of their own, so the shared pool is broken once per bad image and the image
        that kills (or hangs) a process alone is the one that fails."""
        out: list[R | str] = []
        with self._alone:
            private: _Pool | None = None
            try:
                for item in items:
                    if self._closed:
                        raise _stopping()
                    if private is None:
                        private = self._new_pool(1)
                    try:
                        self.run_alone += 1
                        future = private.submit(next(self._task_ids), work.one, item, *work.args)
                        out.append(private.result(future, work.timeout))
                    except BrokenProcessPool:
                        out.append("the decoder process died on this image")
                        private.shutdown()
                        private = None
                    except FutureTimeout:
                        out.append(f"{work.doing} took longer than {work.timeout:.0f} s")
                        private.kill()
                        private.shutdown()
                        private = None
                    except Exception as error:  # its result could not come back
                        out.append(f"could not prepare image: {one_line(error)}")
            finally:
                if private is not None:
                    private.shutdown()
        return out

    def close(self) -> None:
        """Stop the processes, a task still running too (the worker has stopped waiting for
        its group; left running, a fetch or a stuck decode would hold up the worker's exit,
        which waits for the pool's tasks): what was asked and is not done, or is asked after
        this, gets a transient error (its jobs are retried)."""
        with self._lock:
            self._closed = True
            self._pool.kill()  # first: shutdown forgets the processes
            self._pool.shutdown()

    def _replace(self, broken: _Pool) -> None:
        with self._lock:
            if self._closed:
                raise _stopping()
            if self._pool is broken:  # the first of its images to notice replaces it
                log.warning("a decode process died or hung; starting a new pool")
                self._pool = self._new_pool(self.processes)
                self.replaced += 1
        broken.shutdown()

    def _new_pool(self, processes: int) -> _Pool:
        """A pool whose processes have all started (each is spawned for a task that finds no
        idle one): the first images do not wait for them. Started on the spawner thread, so
        they die with the worker, not with the job thread that happened to need them."""
        return on_spawner(lambda: self._start_pool(processes)).result()

    def _start_pool(self, processes: int) -> _Pool:
        began = self._context.Array("d", processes, lock=False)
        tasks = self._context.Array("q", processes, lock=False)
        slots = self._context.Value("i", 0)
        executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=self._context,
            initializer=start,
            initargs=(os.getpid(), began, tasks, slots),
        )
        pool = _Pool(executor, began, tasks)
        try:
            for started in [executor.submit(ready) for _ in range(processes)]:
                started.result(timeout=max(self._timeout, _START_TIMEOUT))
        except (OSError, BrokenProcessPool, FutureTimeout) as error:  # no memory to start one
            pool.kill()
            pool.shutdown()
            raise TransientError(f"cannot start a decode process: {error}") from error
        return pool


@dataclass(frozen=True)
class _Pool:
    """A process pool, and which task each of its processes runs since when (`timed`)."""

    executor: ProcessPoolExecutor
    began: Any  # a shared array of doubles, one per process: monotonic seconds, 0 when idle
    tasks: Any  # a shared array of task ids, one per process: what it began then

    def submit(self, task_id: int, task: Callable[..., R], *args: Any) -> Future[R]:
        return self.executor.submit(timed, task_id, task, *args)

    def started(self, task_id: int) -> bool:
        """Whether a process was running this task (and still was when the pool broke: a
        process's entries stay as they were when it died)."""
        return any(
            began > 0 and task == task_id
            for began, task in zip(self.began[:], self.tasks[:], strict=True)
        )

    def result(self, future: Future[R], timeout: float) -> R:
        """The task's result. FutureTimeout only once one of the pool's processes has been on
        one task longer than `timeout` (a task that waits behind others, a slow host's fetches
        or many groups at once, is not stuck, and killing the pool for it would fail healthy
        work), or once every process has been idle through two checks while the task waited:
        processes that read nothing (stopped, or one frozen holding the task queue's lock)
        would otherwise hold it for good."""
        idle_checks = 0
        while True:
            try:
                return future.result(timeout=min(timeout, _STUCK_CHECK_SECONDS))
            except FutureTimeout:
                idle_checks = idle_checks + 1 if not any(self.began[:]) else 0
                if self.stuck(timeout) or idle_checks >= 2:
                    raise

    def stuck(self, timeout: float) -> bool:
        now = time.monotonic()
        return any(0 < began < now - timeout for began in self.began[:])

    def kill(self) -> None:
        """End the processes now, a stuck one too (`shutdown` would wait for its task; Python
        3.14 has `terminate_workers`, 3.11 only this attribute)."""
        processes = getattr(self.executor, "_processes", None) or {}
        for process in list(processes.values()):
            with contextlib.suppress(Exception):
                process.kill()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _stopping() -> TransientError:
    return TransientError("the worker is stopping: its decode processes are gone")
