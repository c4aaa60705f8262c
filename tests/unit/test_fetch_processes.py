"""worker.fetch_processes (`LV_POOL_FETCHES`): images fetched and decoded in real processes give
exactly what the worker's threads give; each process serves many requests at once, so a slow
host holds only its own; a process that dies or hangs hands its images back to the worker's
threads and the decode pool, where only the image that kills fails; closing ends the waits."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.errors import TransientError
from tests.child_processes import gone_within, started_by_a_worker_that_exits
from tests.decode_cues import HANG, KILLER, SLOW, crash_on_cue
from tests.images import truncated_jpeg
from tests.unit.fetch_servers import serve
from tests.unit.test_decode_pool import DRAFT, MAX_PIXELS, SIDE, prepare_all
from tests.unit.test_tensor_input import encode, sample_blobs, textured
from worker.decode_child import DecodedForModel
from worker.decode_pool import DecodePool
from worker.fetch import FetchPolicy
from worker.fetch_processes import FetchProcesses
from worker.image_fetch import FailedImage, FetchedBytes, ImageRequest, fetch_each
from worker.images import PreparedImage


def _processes(count: int = 2, **options: Any) -> FetchProcesses:
    return FetchProcesses(
        count, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue, **options
    )


@pytest.fixture
def fetchers() -> Iterator[FetchProcesses]:
    made = _processes()
    yield made
    made.close()


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    made = DecodePool(1, max_pixels=MAX_PIXELS, draft_size=DRAFT, side=SIDE, work=crash_on_cue)
    yield made
    made.close()


def _policy(root: Path, timeout: float = 10.0) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=10_000_000,
        timeout=timeout,
        allowed_private_networks=(ipaddress.ip_network("127.0.0.0/8"),),
        file_roots=(root,),
    )


def _files(root: Path, blobs: list[bytes]) -> list[ImageRequest]:
    for i, blob in enumerate(blobs):
        (root / f"{i}.img").write_bytes(blob)
    return [ImageRequest(i, (root / f"{i}.img").as_uri()) for i in range(len(blobs))]


def test_fetched_in_the_processes_gives_what_the_threads_give(
    fetchers: FetchProcesses, tmp_path: Path
) -> None:
    """Files and http, good and bad, a server's 503 and a missing file: the processes fetch
    and decode them to exactly what the worker's threads give, failures word for word, and a
    transient failure stays transient (the job is retried)."""
    cut = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    requests = _files(tmp_path, [*sample_blobs(), cut, b"not an image at all"])
    urls = [r.url for r in requests] + [(tmp_path / "missing.jpg").as_uri()]
    with serve() as server:
        urls += [f"{server.base_url}/slow/0", f"{server.base_url}/status/503"]
        requests = [ImageRequest(i, url) for i, url in enumerate(urls)]
        policy = _policy(tmp_path)
        with ThreadPoolExecutor(4) as executor:
            by_threads = fetch_each(requests, policy, executor)
            by_processes = fetch_each(requests, policy, executor, elsewhere=fetchers.fetch_many)

    assert isinstance(by_processes[-1], TransientError)
    assert isinstance(by_threads[-1], TransientError)
    assert str(by_processes[-1]) == str(by_threads[-1])
    pooled = [item for item in by_processes if not isinstance(item, TransientError)]
    threaded = [item for item in by_threads if not isinstance(item, TransientError)]
    for item in pooled:  # the bytes stayed in the fetch process, the pixels came back
        if isinstance(item, FetchedBytes):
            assert item.data == b"" and item.decoded is not None
    got, want = prepare_all(pooled, None), prepare_all(threaded, None)
    assert len(got) == len(want) == len(urls) - 1
    for one, other in zip(got, want, strict=True):
        assert type(one) is type(other)
        if isinstance(other, FailedImage):
            assert one == other
            continue
        assert isinstance(one, PreparedImage) and isinstance(other, PreparedImage)
        assert one.facts == other.facts
        assert isinstance(one.pixels, torch.Tensor) and isinstance(other.pixels, torch.Tensor)
        assert torch.equal(one.pixels, other.pixels)
    assert sum(isinstance(r, FailedImage) for r in got) == 3  # truncated, not an image, missing
    assert fetchers.refetched == 0 and fetchers.restarted == 0


def test_a_slow_host_holds_only_its_own_requests(tmp_path: Path) -> None:
    """One process: a group whose image takes 3 s is in flight, and groups sent after it get
    their images at once (a process of the decode pool ran one task at a time, and they
    waited the 3 s behind it)."""
    single = _processes(1)
    blobs = [encode(textured(40, 30, seed=i), "JPEG") for i in range(6)]
    requests = _files(tmp_path, blobs)
    policy = _policy(tmp_path)
    try:
        single.fetch_many(requests[:1], policy, None)  # warm: the process's first imports
        with serve() as server, ThreadPoolExecutor(8) as groups:
            slow = groups.submit(
                single.fetch_many, [ImageRequest(0, f"{server.base_url}/slow/3")], policy, None
            )
            time.sleep(0.3)  # in flight
            began = time.monotonic()
            quick = [groups.submit(single.fetch_many, [r], policy, None) for r in requests]
            answers = [f.result(timeout=10) for f in quick]
            took = time.monotonic() - began
            (slow_answer,) = slow.result(timeout=10)
    finally:
        single.close()

    assert took < 2.0, f"the quick groups waited {took:.1f} s behind the slow host"
    assert all(isinstance(a, FetchedBytes) and a.decoded for (a,) in answers)
    assert isinstance(slow_answer, FetchedBytes) and slow_answer.decoded


def test_an_image_that_kills_its_fetching_process_fails_alone(
    fetchers: FetchProcesses, pool: DecodePool, tmp_path: Path
) -> None:
    """The process dies with images in flight: they are fetched again by the worker's threads
    and left undecoded; the decode pool then fails only the image that kills; the next
    request gets a new process."""
    blobs = [encode(textured(50, 40, seed=i), "JPEG") for i in range(5)]
    blobs.insert(2, KILLER)
    requests = _files(tmp_path, blobs)

    got = fetchers.fetch_many(requests, _policy(tmp_path), None)

    assert not any(isinstance(r, TransientError) for r in got)
    assert fetchers.refetched >= 1 and fetchers.restarted == 0
    again = [r for r in got if isinstance(r, FetchedBytes) and r.decoded is None]
    assert KILLER in [r.data for r in again]
    prepared = prepare_all([r for r in got if not isinstance(r, TransientError)], pool)
    assert [i for i, r in enumerate(prepared) if isinstance(r, FailedImage)] == [2]
    assert isinstance(prepared[2], FailedImage) and "decoder process died" in prepared[2].error
    after = fetchers.fetch_many(requests[:2], _policy(tmp_path), None)
    assert all(isinstance(r, FetchedBytes) and r.decoded for r in after)
    assert fetchers.restarted == 1


def test_a_process_stuck_on_an_image_is_killed_and_its_images_fetched_again(
    tmp_path: Path,
) -> None:
    """A decode that hangs: once it has run past the fetch timeout plus the decode's, its
    process is killed, its images come back undecoded (the decode pool times the hang out
    alone), and healthy requests that merely waited are not mistaken for it."""
    stuck = _processes(1, decode_timeout=2.0)
    blobs = [encode(textured(40, 30, seed=i), "JPEG") for i in range(3)]
    requests = _files(tmp_path, [blobs[0], HANG, blobs[1]])
    try:
        began = time.monotonic()
        got = stuck.fetch_many(requests, _policy(tmp_path, timeout=1.0), None)
        took = time.monotonic() - began
        after = stuck.fetch_many(requests[:1], _policy(tmp_path), None)
    finally:
        stuck.close()

    assert took < 15
    hung = got[1]
    assert isinstance(hung, FetchedBytes) and hung.decoded is None and hung.data == HANG
    assert stuck.refetched >= 1
    assert all(isinstance(a, FetchedBytes) and a.decoded for a in after)
    assert stuck.restarted == 1


def test_waiting_for_a_decode_slot_is_not_being_stuck(tmp_path: Path) -> None:
    """Nine images that each take a second to decode, two decode slots, and a limit of 3 s
    (fetch 1 s + decode 2 s): the last waits about 4 s for a slot but decodes in 1, so the
    process is not killed and nothing is fetched again."""
    single = _processes(1, decode_timeout=2.0)
    try:
        got = single.fetch_many(_files(tmp_path, [SLOW] * 9), _policy(tmp_path, 1.0), None)
    finally:
        single.close()

    assert single.refetched == 0 and single.restarted == 0
    assert all(isinstance(r, FetchedBytes) and r.decoded is not None for r in got)


def test_a_process_started_again_from_a_short_lived_thread_outlives_it(tmp_path: Path) -> None:
    """The parent-death signal follows the thread that started a process: one started again
    for a job's passing thread must not die with that thread (processes start on the
    spawner thread)."""
    single = _processes(1)
    requests = _files(tmp_path, [encode(textured(40, 30), "JPEG")])
    try:
        first = single._children[0].process
        first.kill()
        first.join()
        deadline = time.monotonic() + 10
        while single._children[0].ended is None and time.monotonic() < deadline:
            time.sleep(0.05)
        policy = _policy(tmp_path)
        passing = threading.Thread(target=single.fetch_many, args=(requests, policy, None))
        passing.start()
        passing.join(30)
        second = single._children[0].process
        time.sleep(1.0)  # the thread has ended
        assert second.pid != first.pid and second.is_alive()
        (got,) = single.fetch_many(requests, _policy(tmp_path), None)
    finally:
        single.close()

    assert isinstance(got, FetchedBytes) and got.decoded is not None
    assert single.restarted == 1


def test_closing_ends_a_wait_on_a_frozen_process_at_once(tmp_path: Path) -> None:
    """A process that reads nothing (stopped here; a decoder hang holding its GIL in life)
    while a group sends it 10,000 requests, more than the pipe holds: neither the group nor
    the close blocks on the pipe."""
    frozen = _processes(1)
    pid = frozen._children[0].process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    requests = [ImageRequest(i, f"http://127.0.0.1:9/{'x' * 80}/{i}.jpg") for i in range(10_000)]
    answers: list[object] = []

    def group() -> None:
        try:
            answers.append(frozen.fetch_many(requests, _policy(tmp_path), None))
        except BaseException as error:
            answers.append(error)

    thread = threading.Thread(target=group)
    thread.start()
    time.sleep(1.0)
    began = time.monotonic()
    frozen.close()
    thread.join(10)
    took = time.monotonic() - began

    assert not thread.is_alive() and took < 5, f"{took:.1f} s"
    (answer,) = answers
    assert isinstance(answer, list) and len(answer) == len(requests)
    assert all(isinstance(a, TransientError) and "stopping" in str(a) for a in answer)


def test_a_frozen_process_is_killed_and_its_requests_go_to_its_successor(tmp_path: Path) -> None:
    """A process that reads nothing (stopped here) is idle with requests in flight: after two
    checks it is killed, and the requests, none of which had begun, are sent to a new one."""
    single = _processes(1)
    pid = single._children[0].process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    requests = _files(tmp_path, [encode(textured(40, 30, seed=i), "JPEG") for i in range(3)])
    try:
        began = time.monotonic()
        got = single.fetch_many(requests, _policy(tmp_path), None)
        took = time.monotonic() - began
    finally:
        single.close()

    assert all(isinstance(r, FetchedBytes) and r.decoded is not None for r in got)
    assert single.restarted == 1 and single.refetched == 0
    assert took < 30
    assert gone_within([pid])


def test_a_process_that_does_not_answer_by_the_attempts_deadline_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode that hangs well inside the stuck limit: the request is given up transiently
    (the job is retried) soon after the attempt's deadline, not when the process is killed
    minutes later."""
    monkeypatch.setattr("worker.fetch_processes._DEADLINE_GRACE", 1.0)
    single = _processes(1, decode_timeout=600.0)
    requests = _files(tmp_path, [HANG])
    try:
        began = time.monotonic()
        (got,) = single.fetch_many(requests, _policy(tmp_path), began + 1.0)
        took = time.monotonic() - began
    finally:
        single.close()

    assert isinstance(got, TransientError) and "LV_TASK_TIME_LIMIT" in str(got), got
    assert took < 15


def test_closing_while_images_are_fetched_again_gives_a_transient_error(tmp_path: Path) -> None:
    """The process died with slow images in flight and the worker's threads fetch them again
    when the worker stops: the group gets the stopping error at once (its jobs are retried),
    not a CancelledError after the slowest refetch."""
    single = _processes(1)
    killer = _files(tmp_path, [KILLER])
    answers: list[object] = []
    with serve() as server:
        slow = [ImageRequest(i, f"{server.base_url}/slow/{4 if i == 0 else 1}") for i in range(5)]

        def group() -> None:
            try:
                answers.append(single.fetch_many([*slow, killer[0]], _policy(tmp_path), None))
            except BaseException as error:
                answers.append(error)

        thread = threading.Thread(target=group)
        thread.start()
        deadline = time.monotonic() + 20
        while single.refetched == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        began = time.monotonic()
        single.close()
        thread.join(10)
        took = time.monotonic() - began

    assert single.refetched > 0
    assert not thread.is_alive() and took < 2, f"{took:.1f} s"
    (answer,) = answers
    assert isinstance(answer, TransientError) and "stopping" in str(answer)


def test_for_a_device_that_decodes_jpegs_the_processes_send_them_back_encoded(
    tmp_path: Path,
) -> None:
    jpeg = encode(textured(50, 40), "JPEG")
    png = encode(textured(50, 40), "PNG")
    requests = _files(tmp_path, [jpeg, png])
    keeping = _processes(1, keep_jpegs=True)
    try:
        left, decoded = keeping.fetch_many(requests, _policy(tmp_path), None)
    finally:
        keeping.close()

    assert isinstance(left, FetchedBytes) and left.data == jpeg and left.decoded is None
    assert isinstance(decoded, FetchedBytes) and decoded.data == b""
    assert isinstance(decoded.decoded, DecodedForModel)
    assert decoded.sha256 == hashlib.sha256(png).hexdigest()


def test_a_fetch_in_a_process_keeps_the_attempts_deadline(
    fetchers: FetchProcesses, tmp_path: Path
) -> None:
    """The deadline is on the monotonic clock every process shares: past it, nothing is
    fetched and the image is transiently failed (the job is retried); a slow host is cut
    short at it."""
    (tmp_path / "a.jpg").write_bytes(encode(textured(20, 20), "JPEG"))
    with serve() as server:
        requests = [
            ImageRequest(0, (tmp_path / "a.jpg").as_uri()),
            ImageRequest(1, f"{server.base_url}/slow/5"),
        ]
        began = time.monotonic()
        (late,) = fetchers.fetch_many(requests[:1], _policy(tmp_path), began - 1)
        (_, cut) = fetchers.fetch_many(requests, _policy(tmp_path), time.monotonic() + 1.0)
        took = time.monotonic() - began

    assert isinstance(late, TransientError) and "LV_TASK_TIME_LIMIT" in str(late)
    assert isinstance(cut, TransientError) and "LV_TASK_TIME_LIMIT" in str(cut)
    assert took < 4


def test_closing_ends_the_waits_at_once_and_their_jobs_are_retried(tmp_path: Path) -> None:
    """The worker stops while a group waits for a 30-s host: the group gets a transient error
    at once (its jobs are retried), the process is gone, and a group asked after the close
    gets one too, with no process started behind the stop."""
    closing = _processes(1)
    answers: list[object] = []
    with serve() as server:

        def group() -> None:
            request = ImageRequest(0, f"{server.base_url}/slow/30")
            try:
                answers.append(closing.fetch_many([request], _policy(tmp_path, 60.0), None))
            except BaseException as error:
                answers.append(error)

        pids = {closing._children[0].process.pid}
        thread = threading.Thread(target=group)
        thread.start()
        time.sleep(1.0)  # in flight
        began = time.monotonic()
        closing.close()
        thread.join(timeout=10)
        took = time.monotonic() - began

    assert not thread.is_alive() and took < 5
    ((answer,),) = answers  # type: ignore[misc]
    assert isinstance(answer, TransientError) and "stopping" in str(answer)
    with pytest.raises(TransientError, match="stopping"):
        closing.fetch_many(_files(tmp_path, [b"x"]), _policy(tmp_path), None)
    assert closing.restarted == 0
    assert gone_within(pid for pid in pids if pid)


def test_the_fetch_processes_die_with_the_worker_however_it_ends() -> None:
    """`os._exit` (the stall watchdog's way out) and SIGKILL skip every clean-up: the fetch
    processes must not live on without their worker."""
    pids = started_by_a_worker_that_exits(
        "worker.fetch_processes", "FetchProcesses(2, max_pixels=10**6, draft_size=64, side=32)"
    )
    assert len(pids) == 2
    assert gone_within(pids)


def test_the_fetch_child_needs_no_torch() -> None:
    code = "import sys, worker.fetch_child; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
