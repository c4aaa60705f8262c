"""The group-commit writer runs two transactions at once: a delivery that arrives while one
commits goes to the idle lane instead of waiting behind it."""

from __future__ import annotations

import threading
import time
from typing import Any

from worker.outcomes import OutcomeWriter


class HeldWriter(OutcomeWriter):
    """Each transaction waits for `go`: what runs at once can be seen."""

    def __init__(self, lanes: int) -> None:
        super().__init__(sessions=None, lanes=lanes)  # type: ignore[arg-type]
        self.running: list[int] = []
        self.go = threading.Event()

    def _write(self, outcomes: list[Any]) -> list[bool]:
        self.running.append(len(outcomes))
        self.go.wait(10)
        return [True] * len(outcomes)


def _deliver(writer: OutcomeWriter, count: int) -> threading.Thread:
    thread = threading.Thread(target=writer.write_many, args=([object()] * count, 30.0))
    thread.start()
    return thread


def _until(condition: Any, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def test_a_delivery_commits_beside_one_already_committing() -> None:
    writer = HeldWriter(lanes=2)
    try:
        first = _deliver(writer, 3)
        assert _until(lambda: writer.running == [3])  # a delivery's outcomes: one transaction
        second = _deliver(writer, 2)
        assert _until(lambda: sorted(writer.running) == [2, 3])
    finally:
        writer.go.set()
        first.join(10)
        second.join(10)
        writer.close()


def test_with_one_lane_the_second_delivery_waits() -> None:
    writer = HeldWriter(lanes=1)
    try:
        first = _deliver(writer, 3)
        assert _until(lambda: writer.running == [3])
        second = _deliver(writer, 2)
        assert not _until(lambda: len(writer.running) > 1, seconds=0.5)
    finally:
        writer.go.set()
        first.join(10)
        second.join(10)
        writer.close()
    assert writer.running == [3, 2]
