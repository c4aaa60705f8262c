"""worker.batching.DynamicBatcher: grouping, size limits, deadlines and failure bisection.

Batches are made deterministic with a gate: a first item holds the batcher thread inside
`run_batch` until the test has queued what it wants, so the next batches see a known queue.
Every wait has a deadline; no test sleeps for a fixed time.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import pytest

from worker.batching import DynamicBatcher

TIMEOUT = 5.0  # the longest any single wait may take before the test fails
GATE = "gate"


class Model:
    """A fake `run_batch`: records each call's items; the GATE item blocks until opened."""

    def __init__(self, compute: Callable[[Any], Any] = lambda item: item * 10) -> None:
        self.compute = compute
        self.batches: list[list[Any]] = []
        self.started = threading.Event()
        self.opened = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, items: list[Any]) -> list[Any]:
        with self._lock:
            self.batches.append(list(items))
        if GATE in items:
            self.started.set()
            assert self.opened.wait(TIMEOUT), "the test never opened the gate"
            return [GATE if item == GATE else self.compute(item) for item in items]
        return [self.compute(item) for item in items]

    def after_gate(self) -> list[list[Any]]:
        """The batches run after the gate's own batch."""
        return self.batches[1:]


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., DynamicBatcher[Any, Any]]]:
    """Builds batchers and closes every one of them when the test ends."""
    made: list[DynamicBatcher[Any, Any]] = []

    def make(run_batch: Callable[[list[Any]], list[Any]], **options: Any) -> DynamicBatcher:
        options.setdefault("max_size", 16)
        options.setdefault("max_wait", 0.0)
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(run_batch, **options)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


def hold(batcher: DynamicBatcher[Any, Any], model: Model) -> Future[Any]:
    """Park the batcher thread inside `run_batch` on the gate item."""
    gate = batcher.submit(GATE)
    assert model.started.wait(TIMEOUT)
    return gate


def results(futures: list[Future[Any]]) -> list[Any]:
    return [future.result(timeout=TIMEOUT) for future in futures]


# --- grouping --------------------------------------------------------------------------------


def test_items_from_many_threads_are_grouped_into_fewer_calls(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=16, max_wait=0.05)
    hold(batcher, model)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = list(pool.map(batcher.submit, range(64)))
    model.opened.set()

    assert results(futures) == [i * 10 for i in range(64)]
    sizes = [len(batch) for batch in model.after_gate()]
    assert sum(sizes) == 64
    assert len(sizes) < 64
    assert max(sizes) <= 16
    assert batcher.stats.calls == len(model.batches)


def test_queued_items_are_taken_in_full_batches_of_max_size(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=4, max_wait=0.0)
    hold(batcher, model)

    futures = [batcher.submit(i) for i in range(10)]
    model.opened.set()

    assert results(futures) == [i * 10 for i in range(10)]
    assert model.after_gate() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_full_batch_runs_without_waiting_for_max_wait(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=4, max_wait=60.0)

    started = time.monotonic()
    futures = [batcher.submit(i) for i in range(4)]

    assert results(futures) == [0, 10, 20, 30]
    assert time.monotonic() - started < TIMEOUT
    assert model.batches == [[0, 1, 2, 3]]


def test_units_weigh_items_against_max_size_and_carry_over_what_does_not_fit(
    make_batcher: Any,
) -> None:
    model = Model(compute=lambda item: item)
    batcher = make_batcher(
        model, max_size=10, units=lambda item: 1 if item == GATE else item // 100
    )
    hold(batcher, model)

    weights = [400, 401, 402, 300, 700]  # units 4, 4, 4, 3, 7
    futures = [batcher.submit(w) for w in weights]
    model.opened.set()

    assert results(futures) == weights
    assert model.after_gate() == [[400, 401], [402, 300], [700]]
    assert batcher.stats.last_batch_units == 7


def test_an_item_heavier_than_max_size_runs_alone(make_batcher: Any) -> None:
    model = Model(compute=lambda item: item)
    batcher = make_batcher(model, max_size=10, units=lambda item: 1 if item == GATE else item)
    hold(batcher, model)

    futures = [batcher.submit(w) for w in (2, 25, 3)]
    model.opened.set()

    assert results(futures) == [2, 25, 3]
    assert model.after_gate() == [[2], [25], [3]]


def test_a_lone_item_is_flushed_after_max_wait(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=100, max_wait=0.05)

    started = time.monotonic()
    future = batcher.submit(7)

    assert future.result(timeout=TIMEOUT) == 70
    elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < TIMEOUT  # it waited for company, then gave up
    assert model.batches == [[7]]


def test_a_lone_item_runs_at_once_when_nothing_else_is_coming(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=100, max_wait=5.0, expecting=lambda: 0)

    started = time.monotonic()
    future = batcher.submit(7, eager=True)

    assert future.result(timeout=TIMEOUT) == 70
    assert time.monotonic() - started < 4.0  # not the 5 s max_wait
    assert model.batches == [[7]]


def test_the_batch_waits_for_items_announced_as_coming_and_only_for_them(
    make_batcher: Any,
) -> None:
    model = Model()
    coming = [1]
    batcher = make_batcher(model, max_size=100, max_wait=5.0, expecting=lambda: coming[0])

    started = time.monotonic()
    first = batcher.submit(1, eager=True)
    time.sleep(0.2)  # the announced job is still fetching its images
    second = batcher.submit(2, eager=True)
    coming[0] = 0
    batcher.wake()  # as InferenceService does when the count falls to zero

    assert results([first, second]) == [10, 20]
    assert model.batches == [[1, 2]]  # waited for the announced item
    assert time.monotonic() - started < 4.0  # and not the 5 s max_wait once nothing was coming


def test_items_arriving_within_max_wait_share_a_batch(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=100, max_wait=2.0)

    first = batcher.submit(1)
    second = batcher.submit(2)
    rest = [batcher.submit(i) for i in range(3, 101)]  # reaches max_size: no need to wait

    assert results([first, second, *rest]) == [i * 10 for i in range(1, 101)]
    assert model.batches == [list(range(1, 101))]


# --- failures --------------------------------------------------------------------------------


def test_one_bad_item_fails_alone_and_the_others_get_their_results(make_batcher: Any) -> None:
    bad = 7

    def run_batch(items: list[int]) -> list[int]:
        if bad in items:
            raise ValueError(f"item {bad} is poison")
        return [item * 10 for item in items]

    batcher = make_batcher(run_batch, max_size=16, max_wait=TIMEOUT)
    futures = [batcher.submit(i) for i in range(16)]  # 16 = max_size: one batch at once
    wait_futures(futures, timeout=TIMEOUT)

    error = futures[bad].exception(timeout=0)
    assert isinstance(error, ValueError)
    assert "poison" in str(error)
    good = [future.result(timeout=0) for i, future in enumerate(futures) if i != bad]
    assert good == [i * 10 for i in range(16) if i != bad]
    assert batcher.stats.splits == 4  # 16 → 8 → 4 → 2 → 1: a bisection, not one call per item
    assert batcher.stats.calls == 9
    assert batcher.stats.items == 16


def test_a_batch_too_big_for_the_model_is_retried_in_halves(make_batcher: Any) -> None:
    def run_batch(items: list[int]) -> list[int]:
        if len(items) > 4:
            raise MemoryError("CUDA out of memory")
        return [-item for item in items]

    batcher = make_batcher(run_batch, max_size=16, max_wait=TIMEOUT)
    futures = [batcher.submit(i) for i in range(16)]

    assert results(futures) == [-i for i in range(16)]
    assert batcher.stats.calls == 1 + 2 + 4


def test_what_a_failed_call_built_is_freed_before_its_halves_run(make_batcher: Any) -> None:
    """A failed call's frames (its stacked batch, a GPU's activations) must not stay alive,
    held by the error's traceback, while the halves run: they need that memory."""

    class Built:  # stands for a big tensor the call made before it failed
        pass

    built: list[weakref.ref[Built]] = []
    alive_when_halves_ran: list[bool] = []

    def run_batch(items: list[int]) -> list[int]:
        if len(items) > 1:
            batch = Built()  # a local of the failing frame, as a stacked input would be
            built.append(weakref.ref(batch))
            raise RuntimeError("CUDA out of memory")
        alive_when_halves_ran.append(built[0]() is not None)
        return items

    batcher = make_batcher(run_batch, max_size=2, max_wait=TIMEOUT)
    futures = [batcher.submit(i) for i in range(2)]

    assert results(futures) == [0, 1]
    assert alive_when_halves_ran == [False, False]


def test_a_wrong_result_count_is_treated_as_a_failure(make_batcher: Any) -> None:
    def run_batch(items: list[int]) -> list[int]:
        answers = [item + 1 for item in items]
        return answers[:-1] if len(items) > 1 else answers  # loses one result per batch

    batcher = make_batcher(run_batch, max_size=8, max_wait=TIMEOUT)
    futures = [batcher.submit(i) for i in range(8)]

    assert results(futures) == [i + 1 for i in range(8)]  # no result is given to the wrong item
    assert batcher.stats.splits > 0


def test_a_batch_that_never_returns_the_right_count_fails_every_item(make_batcher: Any) -> None:
    batcher = make_batcher(lambda items: [], max_size=4, max_wait=TIMEOUT)
    futures = [batcher.submit(i) for i in range(4)]
    wait_futures(futures, timeout=TIMEOUT)

    for future in futures:
        error = future.exception(timeout=0)
        assert isinstance(error, RuntimeError)
        assert "0 results for 1 items" in str(error)


def test_the_batcher_keeps_serving_after_a_failure(make_batcher: Any) -> None:
    calls = iter([RuntimeError("once"), None])

    def run_batch(items: list[int]) -> list[int]:
        error = next(calls, None)
        if error is not None:
            raise error
        return items

    batcher = make_batcher(run_batch, max_size=1)

    with pytest.raises(RuntimeError, match="once"):
        batcher.submit(1).result(timeout=TIMEOUT)
    assert batcher.submit(2).result(timeout=TIMEOUT) == 2


# --- cancellation, shutdown, monitoring ------------------------------------------------------


def test_cancelled_futures_are_skipped(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=16)
    hold(batcher, model)

    futures = [batcher.submit(i) for i in (1, 2, 3)]
    assert futures[1].cancel()
    model.opened.set()

    assert results([futures[0], futures[2]]) == [10, 30]
    assert futures[1].cancelled()
    assert all(2 not in batch for batch in model.batches)


def test_a_batch_of_only_cancelled_futures_is_not_run(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=2)
    hold(batcher, model)

    cancelled = [batcher.submit(i) for i in (1, 2)]
    for future in cancelled:
        future.cancel()
    later = batcher.submit(3)
    model.opened.set()

    assert later.result(timeout=TIMEOUT) == 30
    assert model.after_gate() == [[3]]


def test_a_future_cancelled_while_its_batch_runs_does_not_break_the_batcher(
    make_batcher: Any,
) -> None:
    model = Model()
    batcher = make_batcher(model, max_size=16)
    gate = hold(batcher, model)

    assert gate.cancel()  # the caller's deadline passed while the model was busy
    model.opened.set()

    assert batcher.submit(5).result(timeout=TIMEOUT) == 50


def test_close_runs_queued_batches_then_stops_the_thread(make_batcher: Any) -> None:
    model = Model()
    name = f"test-batcher-{id(model)}"
    batcher = make_batcher(model, max_size=2, name=name)
    hold(batcher, model)
    futures = [batcher.submit(i) for i in range(5)]

    closer = threading.Thread(target=batcher.close)
    closer.start()
    model.opened.set()
    closer.join(TIMEOUT)

    assert not closer.is_alive()
    assert results(futures) == [0, 10, 20, 30, 40]
    assert name not in {thread.name for thread in threading.enumerate()}


def test_close_of_an_idle_batcher_returns_promptly(make_batcher: Any) -> None:
    name = "test-batcher-idle"
    batcher = make_batcher(Model(), name=name)
    assert name in {thread.name for thread in threading.enumerate()}

    started = time.monotonic()
    batcher.close()

    assert time.monotonic() - started < TIMEOUT
    assert name not in {thread.name for thread in threading.enumerate()}


def test_busy_for_counts_the_seconds_of_the_running_call(make_batcher: Any) -> None:
    model = Model()
    batcher = make_batcher(model)
    assert batcher.busy_for() == 0.0

    gate = hold(batcher, model)
    first = batcher.busy_for()
    deadline = time.monotonic() + TIMEOUT
    while batcher.busy_for() <= first and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.busy_for() > first > 0.0

    model.opened.set()
    gate.result(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while batcher.busy_for() != 0.0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.busy_for() == 0.0


def test_stats_count_calls_items_and_units(make_batcher: Any) -> None:
    model = Model(compute=lambda item: item)
    batcher = make_batcher(model, max_size=6, units=lambda item: 1 if item == GATE else 2)
    hold(batcher, model)

    futures = [batcher.submit(i) for i in range(5)]
    model.opened.set()
    results(futures)

    assert batcher.stats.calls == 3  # the gate, [0, 1, 2], [3, 4]
    assert batcher.stats.items == 6
    assert batcher.stats.units == 1 + 10
    assert batcher.stats.last_batch_units == 4


# --- prepare: the next batch made ready while one runs ----------------------------------------


def test_the_next_batch_is_prepared_while_the_current_one_runs(make_batcher: Any) -> None:
    model = Model()
    prepared: list[list[Any]] = []
    next_prepared = threading.Event()

    def prepare(items: list[Any]) -> list[Any]:
        prepared.append(list(items))
        if GATE not in items:
            next_prepared.set()
        return [item if item == GATE else item + 1 for item in items]

    batcher = make_batcher(model, prepare=prepare)
    gate = hold(batcher, model)  # batch 1 is inside run_batch
    later = [batcher.submit(i) for i in (1, 2, 3)]

    assert next_prepared.wait(TIMEOUT)  # prepared while batch 1 still runs
    assert not gate.done() and len(model.batches) == 1
    model.opened.set()

    assert results(later) == [20, 30, 40]  # run on the prepared items
    ran = sorted(item for batch in model.after_gate() for item in batch)
    assert [GATE] in prepared and ran == [2, 3, 4]


def test_while_a_prepared_batch_waits_for_the_model_the_next_keeps_gathering(
    make_batcher: Any,
) -> None:
    """Past `max_wait`: the batch could not reach the model any sooner, so it takes company
    (a GPU worker's batches stay full instead of halving) until the model takes the one
    waiting."""
    model = Model()
    prepared: list[list[Any]] = []
    changed = threading.Condition()

    def prepare(items: list[Any]) -> list[Any]:
        with changed:
            prepared.append(list(items))
            changed.notify_all()
        return items

    batcher = make_batcher(model, max_size=8, max_wait=0.0, prepare=prepare)
    gate = hold(batcher, model)  # on the model
    waiting = batcher.submit(1)  # prepared at once (no wait), then waits for the model
    with changed:
        assert changed.wait_for(lambda: [1] in prepared, TIMEOUT)
    later = [batcher.submit(2)]
    with changed:  # well past max_wait (0 s): still gathering, not prepared
        assert not changed.wait_for(lambda: len(prepared) > 2, 0.3)
    later.append(batcher.submit(3))
    model.opened.set()

    assert results([gate, waiting, *later]) == [GATE, 10, 20, 30]
    assert prepared == [[GATE], [1], [2, 3]]
    assert model.after_gate() == [[1], [2, 3]]


def test_a_prepare_that_raises_fails_its_batch_only(make_batcher: Any) -> None:
    model = Model()

    def prepare(items: list[Any]) -> list[Any]:
        if "bad" in items:
            raise ValueError("decoder broke")
        return items

    batcher = make_batcher(model, prepare=prepare)
    with pytest.raises(ValueError, match="decoder broke"):
        batcher.submit("bad").result(timeout=TIMEOUT)

    assert results([batcher.submit(5)]) == [50]
    assert all("bad" not in batch for batch in model.batches)


def test_closing_a_preparing_batcher_runs_what_was_queued_and_stops_both_threads(
    make_batcher: Any,
) -> None:
    model = Model()
    batcher = make_batcher(model, prepare=lambda items: items)
    queued = [batcher.submit(i) for i in range(5)]

    batcher.close()

    assert results(queued) == [0, 10, 20, 30, 40]
    assert not any(thread.is_alive() for thread in batcher._threads)
