"""CPU time by kind of thread (`worker.thread_cpu`)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from worker.thread_cpu import cpu_seconds_by_thread, thread_kind

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("job-group-3", "job-group"),
        ("ThreadPoolExecutor-1_0", "ThreadPoolExecutor"),
        ("fetch_2", "fetch"),
        ("MainThread", "MainThread"),
        ("outcome-writer", "outcome-writer"),
        ("7", "7"),
    ],
)
def test_a_threads_kind_is_its_name_without_its_number(name: str, kind: str) -> None:
    assert thread_kind(name) == kind


@linux_only
def test_a_busy_named_thread_is_counted_under_its_kind() -> None:
    stop = threading.Event()
    busy = threading.Thread(target=lambda: _spin(stop), name="spinner-7")
    busy.start()
    try:
        time.sleep(0.6)
        during = cpu_seconds_by_thread()
    finally:
        stop.set()
        busy.join()
    assert during.get("spinner", 0.0) >= 0.2, during
    assert "MainThread" in during


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


@linux_only
def test_a_busy_child_process_is_counted() -> None:
    """The decode pool's processes are the worker's too: their CPU counts as `child-processes`."""
    import multiprocessing

    from worker.thread_cpu import CHILDREN

    child = multiprocessing.get_context("spawn").Process(target=_spin_for, args=(30.0,))
    child.start()
    try:
        time.sleep(1.5)  # a spawned child imports first, then spins
        during = cpu_seconds_by_thread()
    finally:
        child.terminate()
        child.join(timeout=10)
    assert during.get(CHILDREN, 0.0) >= 0.2, during


def _spin_for(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))
