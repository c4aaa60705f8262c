"""Decode in a pool of processes (`LV_DECODE_PROCESSES`), so that the Python around Pillow's
decoder (the blur measure's numpy, the pixel layout, the buffers) runs beside the worker's GIL
instead of under it.

Measured on the development machine (docs/architecture.md): one image's fetch-to-pixels path
took the same time per image in one thread as in two, because all but the decoder itself holds
the GIL. A pool process receives the image's bytes and returns its facts and uint8 pixels
(`worker.decode_child`, the functions the threads run when there is no pool), for the tensor
input path only: its pixels are plain arrays, while the PIL path's are each model's own
transform.

A process that dies (a decoder crash on a hostile file, the kernel's OOM killer) or hangs
(killed after `timeout`) breaks the pool for every chunk in it at that moment: the pool is
replaced, and each broken chunk's images are decoded again one at a time in a process of their
own, so the shared pool breaks once per bad image and only the image that kills (or hangs) a
process alone fails ("the decoder process died on this image"); the worker lives on. The pool's
processes die with the worker, however it ends (Linux: the parent-death signal).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import torch

from contract.errors import TransientError, one_line
from worker.decode_child import DecodedForModel, decode_each, decode_for_model, ready, start
from worker.images import FailedImage, FetchedBytes, PreparedImage

log = logging.getLogger(__name__)
# A spawned process imports the decoder's modules before its first task: on a loaded host that
# took longer than a short decode timeout, which is about decoding, not starting.
_START_TIMEOUT = 60.0
CHUNK = 16  # images per task at most: bounds the pixels held in one message, and a timeout

# What a pool process runs on (bytes, sha256, max_pixels, draft_size, side); a parameter for
# the tests, which swap in one that crashes on cue.
DecodeWork = Callable[[bytes, str, int, int, int], DecodedForModel | str]


class DecodePool:
    """`prepare_many(images)` from any thread: each image decoded in a pool process, as a
    `PreparedImage` with uint8 (3, H, W) pixels, or a `FailedImage` with its reason."""

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

    def prepare_many(self, images: Sequence[FetchedBytes]) -> list[PreparedImage | FailedImage]:
        """A group's images in a few tasks (up to `CHUNK` images each): a task's own cost (its
        hand-off, a wake-up of the pool's result thread) is paid per chunk, not per image."""
        if not images:
            return []
        size = min(CHUNK, -(-len(images) // self.processes))
        chunks = [list(images[start : start + size]) for start in range(0, len(images), size)]
        pool = self._pool
        try:
            futures = [
                pool.submit(decode_each, self._work, [_task(image) for image in chunk], *self._args)
                for chunk in chunks
            ]
        except BrokenProcessPool:  # broken by another group's image, not yet replaced
            self._replace(pool)
            again = self._one_by_one(images)
            return [_outcome(image, one) for image, one in zip(images, again, strict=True)]
        except RuntimeError as error:  # shut down: the worker is stopping
            raise _stopping() from error
        got: list[DecodedForModel | str] = []
        for chunk, future in zip(chunks, futures, strict=True):
            try:
                got.extend(future.result(timeout=self._timeout))
                continue
            except CancelledError as error:  # queued when the pool was closed
                raise _stopping() from error
            except BrokenProcessPool:  # a process died, perhaps of an image in this chunk
                self._replace(pool)
            except FutureTimeout:  # a process is stuck, perhaps on an image in this chunk
                _kill(pool)
                self._replace(pool)
            except Exception as error:  # e.g. no memory to send the chunk's pixels back
                log.warning("a decode task failed (%s); decoding its images one by one", error)
            got.extend(self._one_by_one(chunk))
        return [_outcome(image, one) for image, one in zip(images, got, strict=True)]

    def _one_by_one(self, images: Sequence[FetchedBytes]) -> list[DecodedForModel | str]:
        """Images of a chunk that broke (or hung) the shared pool, decoded one at a time in a
        process of their own, so the shared pool is broken once per bad image and the image
        that kills (or hangs) a process alone is the one that fails."""
        out: list[DecodedForModel | str] = []
        with self._alone:
            private: ProcessPoolExecutor | None = None
            try:
                for image in images:
                    if self._closed:
                        raise _stopping()
                    if private is None:
                        private = self._new_pool(1)
                    try:
                        out.append(self._run(private, image))
                    except BrokenProcessPool:
                        out.append("the decoder process died on this image")
                        private.shutdown(wait=False, cancel_futures=True)
                        private = None
                    except FutureTimeout:
                        out.append(self._too_slow())
                        _kill(private)
                        private.shutdown(wait=False, cancel_futures=True)
                        private = None
                    except Exception as error:  # its result could not come back
                        out.append(f"could not prepare image: {one_line(error)}")
            finally:
                if private is not None:
                    private.shutdown(wait=False, cancel_futures=True)
        return out

    def _too_slow(self) -> str:
        return f"decoding took longer than {self._timeout:.0f} s"

    def close(self) -> None:
        """Stop the processes; a decode still asked for after this is a transient error."""
        with self._lock:
            self._closed = True
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, pool: ProcessPoolExecutor, image: FetchedBytes) -> DecodedForModel | str:
        future: Future[DecodedForModel | str] = pool.submit(
            self._work, image.data, image.sha256, *self._args
        )
        return future.result(timeout=self._timeout)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._closed:
                raise _stopping()
            if self._pool is broken:  # the first of its images to notice replaces it
                log.warning("a decode process died or hung; starting a new pool")
                self._pool = self._new_pool(self.processes)
                self.replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        """A pool whose processes have all started (each is spawned for a task that finds no
        idle one): the first images do not wait for them."""
        pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=self._context,
            initializer=start,
            initargs=(os.getpid(),),
        )
        try:
            for started in [pool.submit(ready) for _ in range(processes)]:
                started.result(timeout=max(self._timeout, _START_TIMEOUT))
        except (OSError, BrokenProcessPool, FutureTimeout) as error:  # no memory to start one
            _kill(pool)
            pool.shutdown(wait=False, cancel_futures=True)
            raise TransientError(f"cannot start a decode process: {error}") from error
        return pool


def _kill(pool: ProcessPoolExecutor) -> None:
    """End a pool's processes now, a stuck one too (`shutdown` would wait for its task; Python
    3.14 has `terminate_workers`, 3.11 only this attribute)."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        with contextlib.suppress(Exception):
            process.kill()


def _stopping() -> TransientError:
    return TransientError("the worker is stopping: its decode processes are gone")


def _task(image: FetchedBytes) -> tuple[bytes, str]:
    return image.data, image.sha256


def _outcome(image: FetchedBytes, got: DecodedForModel | str) -> PreparedImage | FailedImage:
    if isinstance(got, str):
        return FailedImage(image.position, image.url, got)
    pixels = torch.from_numpy(got.pixels).permute(2, 0, 1)
    return PreparedImage(image.position, image.url, got.facts, pixels, None, image.validators)
