"""worker.decode_pool: images decoded in a pool of real processes give exactly what the job's
own thread gives (facts, blur, brightness, pixels, refusals), and a process that dies fails
only the image that killed it; the pool is replaced and keeps serving."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.errors import TransientError
from tests.child_processes import gone_within, started_by_a_worker_that_exits
from tests.decode_cues import HANG, KILLER, SLOW, crash_on_cue
from tests.images import png_claiming_size, truncated_jpeg
from tests.unit.test_tensor_input import encode, sample_blobs, textured
from worker.decode_child import DecodedForModel, decode_for_model
from worker.decode_pool import CHUNK, DecodePool
from worker.image_fetch import FailedImage, Fetched, FetchedBytes
from worker.images import PreparedImage, prepare_images

MAX_PIXELS = 40_000_000
DRAFT, SIDE = 256, 64


def fetched(blobs: list[bytes]) -> list[FetchedBytes]:
    return [
        FetchedBytes(i, f"file:///img/{i}", blob, hashlib.sha256(blob).hexdigest())
        for i, blob in enumerate(blobs)
    ]


def thread_pixels(image: object) -> torch.Tensor:
    """What `InferenceService.preprocess` gives on the tensor path."""
    from worker.decode_child import input_pixels

    return torch.from_numpy(input_pixels(image, SIDE)).permute(2, 0, 1)  # type: ignore[arg-type]


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    made = DecodePool(2, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue)
    yield made
    made.close()


def prepare_all(
    items: Sequence[Fetched], pool: DecodePool | None
) -> list[PreparedImage | FailedImage]:
    with ThreadPoolExecutor(4) as executor:
        return prepare_images(
            items,
            {},
            preprocess=thread_pixels,
            max_pixels=MAX_PIXELS,
            draft_size=DRAFT,
            executor=executor,
            decode=pool.prepare_many if pool is not None else None,
        )


def prepared(blobs: list[bytes], pool: DecodePool | None) -> list[PreparedImage | FailedImage]:
    return prepare_all(fetched(blobs), pool)


def test_a_pool_gives_what_the_thread_gives(pool: DecodePool, tmp_path: Path) -> None:
    big = encode(textured(700, 520, seed=3), "PNG")  # reduced by a whole factor (2) first
    bomb = png_claiming_size(tmp_path / "bomb.png", 30_000, 30_000).read_bytes()
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    blobs = [*sample_blobs(), big, bomb, cut, b"not an image at all"]

    by_pool = prepared(blobs, pool)
    by_thread = prepared(blobs, None)

    assert len(by_pool) == len(by_thread) == len(blobs)
    for got, want in zip(by_pool, by_thread, strict=True):
        assert type(got) is type(want)
        if isinstance(want, FailedImage):
            assert got == want  # the same reason, word for word
            continue
        assert isinstance(got, PreparedImage)
        assert got.facts == want.facts  # sizes, format, bytes, blur and brightness
        assert isinstance(got.pixels, torch.Tensor) and isinstance(want.pixels, torch.Tensor)
        assert got.pixels.dtype == torch.uint8
        assert torch.equal(got.pixels, want.pixels)
    assert sum(isinstance(r, FailedImage) for r in by_pool) == 3


def test_a_dying_process_fails_only_the_image_that_killed_it(pool: DecodePool) -> None:
    good = [encode(textured(80, 60, seed=i), "JPEG", quality=90) for i in range(12)]
    blobs = [*good[:6], KILLER, *good[6:]]

    results = prepared(blobs, pool)

    failed = [r for r in results if isinstance(r, FailedImage)]
    assert [r.position for r in failed] == [6]
    assert "decoder process died" in failed[0].error
    assert all(isinstance(r, PreparedImage) for i, r in enumerate(results) if i != 6)
    assert pool.replaced == 1  # the bad image breaks the shared pool once, not again
    after = prepared(good[:3], pool)  # the new pool serves
    assert all(isinstance(r, PreparedImage) for r in after)


def test_the_child_needs_no_torch() -> None:
    """A decode process imports Pillow and numpy, not torch: it starts in a fraction of a
    second, and the pixels cross as a plain array."""

    code = "import sys, worker.decode_child; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    got = decode_for_model(encode(textured(30, 20), "JPEG"), "sha", MAX_PIXELS, DRAFT, SIDE)
    assert isinstance(got, DecodedForModel) and isinstance(got.pixels, np.ndarray)


def test_after_close_a_decode_is_a_transient_error_and_no_pool_is_started() -> None:
    """A group still decoding when the worker stops gets a transient error (its jobs are
    retried), not a crash, and no new processes are started behind the stop."""
    from contract.errors import TransientError

    closing = DecodePool(1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE)
    closing.close()

    with pytest.raises(TransientError, match="stopping"):
        closing.prepare_many(fetched([encode(textured(30, 20), "JPEG")]))
    assert closing.replaced == 0


def test_a_hanging_image_fails_alone_its_process_is_killed_and_the_pool_serves_on() -> None:
    hanging = DecodePool(
        1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, timeout=3.0, work=crash_on_cue
    )
    try:
        good = [encode(textured(40, 30, seed=i), "JPEG") for i in range(3)]
        first = {c.pid for c in _children()}

        results = prepared([good[0], HANG, good[1]], hanging)

        assert isinstance(results[0], PreparedImage) and isinstance(results[2], PreparedImage)
        assert isinstance(results[1], FailedImage) and "longer than 3 s" in results[1].error
        assert all(isinstance(r, PreparedImage) for r in prepared([good[2]], hanging))
        deadline = time.monotonic() + 10
        while first & {c.pid for c in _children() if c.is_alive()} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not first & {c.pid for c in _children() if c.is_alive()}  # the stuck one is gone
    finally:
        hanging.close()


def test_groups_queued_when_the_pool_closes_get_a_transient_error() -> None:
    """Tasks still queued when the worker stops are cancelled: their groups get a transient
    error (the jobs are retried), not a bare CancelledError."""
    from contract.errors import TransientError

    single = DecodePool(1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue)
    answers: list[object] = []

    def group(blob: bytes) -> None:
        try:
            answers.append(single.prepare_many(fetched([blob])))
        except BaseException as error:
            answers.append(error)

    threads = [threading.Thread(target=group, args=(SLOW,))]
    threads += [
        threading.Thread(target=group, args=(encode(textured(30, 20, seed=i), "JPEG"),))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the slow one first; the others queue behind it
    single.close()
    for thread in threads:
        thread.join(timeout=20)

    assert len(answers) == 5
    stopped = [a for a in answers if isinstance(a, BaseException)]
    assert stopped, answers  # more were queued than the pool had taken on
    assert all(isinstance(a, TransientError) and "stopping" in str(a) for a in stopped), stopped


def test_the_pool_processes_die_with_the_worker_however_it_ends() -> None:
    """`os._exit` (the stall watchdog's way out) and SIGKILL skip every clean-up: the pool's
    processes must not live on without their worker."""
    pids = started_by_a_worker_that_exits(
        "worker.decode_pool", "DecodePool(2, max_pixels=10**6, draft_size=64, side=32)"
    )
    assert len(pids) == 2
    assert gone_within(pids)


def _children() -> list:  # type: ignore[type-arg]
    import multiprocessing

    return multiprocessing.active_children()


def test_waiting_behind_other_tasks_is_not_being_stuck() -> None:
    """Three groups, one slow image each (1 s), on one process with a 1.5 s timeout: the third
    waits 2 s for the process but runs 1 s, so nothing is killed and every image decodes (the
    wait used to count, and a healthy task's pool was killed)."""
    busy = DecodePool(
        1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, timeout=1.5, work=crash_on_cue
    )
    answers: list[object] = []

    def group() -> None:
        answers.extend(busy.prepare_many(fetched([SLOW])))

    try:
        threads = [threading.Thread(target=group) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert busy.replaced == 0
    finally:
        busy.close()
    assert len(answers) == 3
    for answer in answers:  # decoded, and refused as what it is: not an image
        assert isinstance(answer, FailedImage), answer
        assert "longer than" not in answer.error and "died" not in answer.error, answer


def test_a_pool_whose_processes_read_nothing_is_replaced() -> None:
    """Every process stopped (one frozen holding the task queue's lock does as much): all are
    idle while the group waits, so after two checks the pool is replaced and the group, which
    no process had begun, is decoded in the new one."""
    frozen = DecodePool(2, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, timeout=3.0)
    try:
        pids = [p.pid for p in frozen._pool.executor._processes.values()]  # type: ignore[attr-defined]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        good = [encode(textured(40, 30, seed=i), "JPEG") for i in range(3)]

        results = prepared(good, frozen)
    finally:
        frozen.close()

    assert all(isinstance(r, PreparedImage) for r in results), results
    assert frozen.replaced == 1 and frozen.run_alone == 0
    assert gone_within(pids)


def test_closing_ends_a_running_task_and_its_group_is_retried() -> None:
    """The worker stops: a task still running (a stuck decode here, a slow host's fetch in
    life) must not hold up its exit, and its group gets a transient error (retried)."""
    closing = DecodePool(
        1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, timeout=60.0, work=crash_on_cue
    )
    answers: list[object] = []

    def group() -> None:
        try:
            answers.append(closing.prepare_many(fetched([HANG])))
        except BaseException as error:
            answers.append(error)

    first = {c.pid for c in _children()}
    thread = threading.Thread(target=group)
    thread.start()
    time.sleep(1.0)  # the hanging task has started
    closing.close()
    thread.join(timeout=15)

    assert not thread.is_alive(), "the group still waits for its stuck task"
    (answer,) = answers
    assert isinstance(answer, TransientError) and "stopping" in str(answer)
    deadline = time.monotonic() + 10
    while first & {c.pid for c in _children() if c.is_alive()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not first & {c.pid for c in _children() if c.is_alive()}


def test_after_a_crash_only_the_chunks_that_had_started_run_one_by_one() -> None:
    """One process, five chunks of 16: the first holds an image that kills its process. The
    chunks that never reached a process are innocent: they go to the new pool whole, and only
    the first chunk's images are run one at a time in private processes."""
    single = DecodePool(1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue)
    try:
        good = [encode(textured(24, 16, seed=i), "JPEG") for i in range(79)]
        results = prepared([KILLER, *good], single)
    finally:
        single.close()

    assert isinstance(results[0], FailedImage) and "died" in results[0].error
    assert all(isinstance(r, PreparedImage) for r in results[1:])
    assert single.replaced == 1
    assert single.run_alone == CHUNK  # the killer's chunk, not all 80 images
