"""Decode in a pool of processes (`LV_DECODE_PROCESSES`), so that the Python around Pillow's
decoder (the blur measure's numpy, the pixel layout, the buffers) runs beside the worker's GIL
instead of under it.

Measured on the development machine (docs/architecture.md): one image's fetch-to-pixels path
took the same time per image in one thread as in two, because all but the decoder itself holds
the GIL. A pool process receives the image's bytes and returns its facts and uint8 pixels
(`worker.decode_child`, the functions the threads run when there is no pool), for the tensor
input path only: its pixels are plain arrays, while the PIL path's are each model's own
transform.

A process that dies (a decoder crash on a hostile file, the kernel's OOM killer) breaks the pool
for every image in it at that moment: the pool is replaced, and each of those images is decoded
once more in a process of its own, so only the image that kills its process fails ("the
decoder process died"); the worker lives on.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import torch

from db.records import ImageFacts
from worker.decode_child import DecodedForModel, decode_for_model, ready
from worker.images import FailedImage, FetchedBytes, PreparedImage

log = logging.getLogger(__name__)

# What a pool process runs on (bytes, max_pixels, draft_size, side); a parameter for the
# tests, which swap in one that crashes on cue.
DecodeWork = Callable[[bytes, int, int, int], DecodedForModel | str]


class DecodePool:
    """`prepare(image)` from any thread: the image decoded in a pool process, as a
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
        self._alone = threading.BoundedSemaphore(self.processes)  # isolated retries at once
        self._pool = self._new_pool(self.processes)
        self.replaced = 0  # pools replaced after a process died (for tests and the log)

    def prepare(self, image: FetchedBytes) -> PreparedImage | FailedImage:
        pool = self._pool
        try:
            got = self._run(pool, image.data)
        except BrokenProcessPool:
            self._replace(pool)
            got = self._alone_run(image.data)
        except FutureTimeout:
            got = f"decoding took longer than {self._timeout:.0f} s"
        if isinstance(got, str):
            return FailedImage(image.position, image.url, got)
        facts = ImageFacts(
            image.sha256, got.width, got.height, got.format, got.bytes, got.blur, got.brightness
        )
        pixels = torch.from_numpy(got.pixels).permute(2, 0, 1)
        return PreparedImage(image.position, image.url, facts, pixels, None, image.validators)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, pool: ProcessPoolExecutor, data: bytes) -> DecodedForModel | str:
        future: Future[DecodedForModel | str] = pool.submit(self._work, data, *self._args)
        return future.result(timeout=self._timeout)

    def _alone_run(self, data: bytes) -> DecodedForModel | str:
        """Once more in a process of its own: an image that was only in the same pool as the
        one that killed it succeeds; the one that kills this process too is the culprit."""
        with self._alone:
            alone = self._new_pool(1)
            try:
                return self._run(alone, data)
            except BrokenProcessPool:
                return "the decoder process died on this image"
            except FutureTimeout:
                return f"decoding took longer than {self._timeout:.0f} s"
            finally:
                alone.shutdown(wait=False, cancel_futures=True)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # the first of its images to notice replaces it
                log.warning("a decode process died; starting a new pool")
                self._pool = self._new_pool(self.processes)
                self.replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        """A pool whose processes have all started (each is spawned for a task that finds no
        idle one): the first images do not wait for them."""
        pool = ProcessPoolExecutor(max_workers=processes, mp_context=self._context)
        for started in [pool.submit(ready) for _ in range(processes)]:
            started.result(timeout=self._timeout)
        return pool
