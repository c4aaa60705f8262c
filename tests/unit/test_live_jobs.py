"""The registry of jobs live in a worker process (`worker.live_jobs`)."""

from __future__ import annotations

import threading
import time
import uuid

from worker.live_jobs import LiveJobs


def test_a_second_holder_waits_for_the_first_to_end() -> None:
    live, job = LiveJobs(), uuid.uuid4()
    order: list[str] = []
    with live.holding(job, timeout=5) as held:
        assert held and job in live

        def second() -> None:
            with live.holding(job, timeout=5) as again:
                order.append(f"second held={again}")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first ends")
    thread.join(5)
    assert order == ["first ends", "second held=True"]
    assert job not in live


def test_a_hold_that_does_not_end_in_time_yields_false_and_holds_nothing() -> None:
    live, job = LiveJobs(), uuid.uuid4()
    assert live.try_hold([job]) == {job}
    started = time.monotonic()
    with live.holding(job, timeout=0.2) as held:
        assert not held
    assert time.monotonic() - started >= 0.2
    assert job in live  # the first holder's hold stands
    live.release([job])
    assert job not in live


def test_try_hold_takes_only_the_free_ones_and_each_once() -> None:
    live = LiveJobs()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert live.try_hold([a]) == {a}
    assert live.try_hold([a, b, b, c]) == {b, c}
    live.release([b, c])
    assert live.try_hold([b]) == {b}
