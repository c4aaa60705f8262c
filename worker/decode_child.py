"""What a decode process runs (`LV_DECODE_PROCESSES`; a fetch process too, `worker.fetch_child`):
an image's bytes turned into its facts, its blur and brightness, and the tensor input path's
uint8 pixels. It needs Pillow, numpy and plain records, no torch; the worker's threads run the
same functions when there is no pool, so both give the same numbers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from contract.errors import ListingError, one_line
from db.records import ImageFacts
from worker.decode import decode_image
from worker.quality import measure_quality


@dataclass(frozen=True)
class DecodedForModel:
    """One decoded image as the tensor input path takes it, with the facts stored for it."""

    facts: ImageFacts
    pixels: np.ndarray  # uint8 (H, W, 3)


_PR_SET_PDEATHSIG = 1
_began: Any = None  # the pool's shared array of task start times (monotonic; 0: idle)
_tasks: Any = None  # the pool's shared array of the tasks begun then
_slot = -1  # this process's place in it
R = TypeVar("R")

# What decodes one image: (bytes, sha256, max_pixels, draft_size, side); the tests swap in one
# that crashes on cue.
DecodeWork = Callable[[bytes, str, int, int, int], DecodedForModel | str]


def start(parent: int, began: Any = None, tasks: Any = None, slots: Any = None) -> None:
    """A pool process's initializer: it dies with the worker (Linux: the kernel sends SIGKILL
    when the worker ends, even by `os._exit` or SIGKILL, which skip every clean-up), and
    Ctrl-C is the worker's to handle, not its. `began`, `tasks` (shared arrays) and `slots`
    (a shared counter): where it records which task it runs since when (`timed`)."""
    global _began, _tasks, _slot
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker ended before the line above took effect
        os._exit(0)
    if began is not None and tasks is not None and slots is not None:
        with slots.get_lock():
            _slot, slots.value = slots.value, slots.value + 1
        _began, _tasks = began, tasks


def timed(task_id: int, task: Callable[..., R], *args: Any) -> R:
    """Run one pool task with its id and start recorded where the worker reads them: a task
    that waits for a busy process is not stuck, one that has run longer than the timeout is;
    and when a process dies, the tasks that never started are not suspects."""
    if _began is None or _tasks is None or not 0 <= _slot < len(_began):
        return task(*args)
    _tasks[_slot] = task_id
    _began[_slot] = time.monotonic()
    try:
        return task(*args)
    finally:
        _began[_slot] = 0.0


def ready() -> int:
    """A pool process's answer to the warm-up: it has started and imported all of the above."""
    return os.getpid()


def input_pixels(image: Image.Image, side: int) -> np.ndarray:
    """uint8 (H, W, 3) pixels for the tensor path, which resizes them in the batch: a huge PNG
    (JPEGs are drafted already) is first reduced by a whole factor (box filter) to at most about
    four times the model's input side."""
    factor = min(image.size) // (4 * side)
    if factor >= 2:
        image = image.reduce(factor)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def decode_each(
    work: DecodeWork,
    images: list[tuple[bytes, str]],
    max_pixels: int,
    draft_size: int,
    side: int,
) -> list[DecodedForModel | str]:
    """A pool task: several images (`work` on each, with its SHA-256), so a task's hand-off is
    paid per chunk."""
    return [work(data, sha256, max_pixels, draft_size, side) for data, sha256 in images]


def decode_one(
    work: DecodeWork, image: tuple[bytes, str], max_pixels: int, draft_size: int, side: int
) -> DecodedForModel | str:
    """One image alone (in a private process, after its chunk broke the pool)."""
    return work(image[0], image[1], max_pixels, draft_size, side)


def decode_and_measure(
    data: bytes, sha256: str, max_pixels: int, draft_size: int
) -> tuple[ImageFacts, Image.Image]:
    """Decode one image and measure it: its facts (size, format, blur, brightness) and its RGB
    pixels. `ImageRejected` (a `ListingError`) when it cannot be used."""
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    quality = measure_quality(decoded.pixels)
    facts = ImageFacts(
        sha256,
        decoded.width,
        decoded.height,
        decoded.format,
        decoded.bytes,
        quality.blur,
        quality.brightness,
    )
    return facts, decoded.pixels


def decode_for_model(
    data: bytes, sha256: str, max_pixels: int, draft_size: int, side: int
) -> DecodedForModel | str:
    """Decode, measure and lay out one image; an image that cannot be used gives its one-line
    reason instead (an exception would have to cross the process boundary)."""
    try:
        facts, image = decode_and_measure(data, sha256, max_pixels, draft_size)
        return DecodedForModel(facts, input_pixels(image, side))
    except ListingError as error:
        return str(error)
    except Exception as error:  # a decoder bug on odd input: this image only
        return f"could not prepare image: {one_line(error)}"
