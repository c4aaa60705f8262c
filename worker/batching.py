"""Dynamic batching: many task threads submit items, one thread runs them as model batches.

A batch is run when `max_size` units wait or when the oldest item has waited `max_wait` seconds,
whichever comes first; items already queued are always taken at once. If a batch call raises,
the batch is split in half and each half run again, so one bad item fails alone and the others
still get their results (the complaint behind Ray #66140 and Infinity #367). Errors that no
item can cause (`splits_on` says which) fail the whole batch at once instead. With `expecting`
(how many items are on their way: jobs still fetching and decoding) the batcher waits only
while more items are coming; a lone job on an idle worker runs at once. With `prepare`, a
second thread runs it on each collected batch (JPEGs decoded on the device) while the previous
batch is still in `run_batch`: batch k+1 is made ready while batch k runs. While a prepared batch
waits for the model, the batch after it keeps gathering items past `max_wait` (it could not run
any sooner), so a busy GPU worker's batches stay full.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


class _Wake:
    """Queued by `wake`: look at `expecting` again."""


_WAKE = _Wake()


class _Closing:
    """Returned by `_next` when `close` was called while a batch was being collected."""


_CLOSING = _Closing()


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    units: int
    eager: bool = False
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for monitoring and tests: how many calls served how many items."""

    calls: int = 0  # every call of run_batch, failed ones included
    items: int = 0
    units: int = 0
    splits: int = 0
    last_batch_units: int = 0


class DynamicBatcher(Generic[T, R]):
    """Turns `submit(item)` calls from any thread into `run_batch(list_of_items)` calls."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        *,
        max_size: int,
        max_wait: float,
        units: Callable[[T], int] = lambda _item: 1,
        name: str = "batcher",
        splits_on: Callable[[Exception], bool] = lambda _error: True,
        expecting: Callable[[], int] | None = None,
        prepare: Callable[[list[T]], list[T]] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._prepare = prepare
        self._max_size = max(1, max_size)
        self._max_wait = max(0.0, max_wait)
        self._units = units
        self._splits_on = splits_on
        self._expecting = expecting
        self._queue: queue.Queue[_Pending[T, R] | _Wake | None] = queue.Queue()
        self._carry: _Pending[T, R] | None = None
        self._busy_since: float | None = None
        self.stats = BatchStats()
        # Prepared batches wait here for the model thread: one at most, so preparing runs one
        # batch ahead and never piles decoded pixels up.
        self._ready: queue.Queue[list[_Pending[T, R]] | None] = queue.Queue(maxsize=1)
        self._threads = [threading.Thread(target=self._loop, name=name, daemon=True)]
        if prepare is not None:
            self._threads.append(
                threading.Thread(target=self._run_ready, name=f"{name}-run", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def submit(self, item: T, eager: bool = False) -> Future[R]:
        """Queue `item`; the future gets its result, or the exception its batch raised alone.
        `eager`: its submitter announced itself in `expecting`, so a batch holding it runs as
        soon as nobody else is expected (others wait up to `max_wait`, as before)."""
        future: Future[R] = Future()
        self._queue.put(_Pending(item, future, max(1, self._units(item)), eager))
        return future

    def wake(self) -> None:
        """The `expecting` count fell to zero: a batch waiting for company runs now (without
        this, the batcher would have to poll the count while it waits)."""
        self._queue.put(_WAKE)

    def busy_for(self) -> float:
        """Seconds the current batch call has been running (0 when idle): for a stall watchdog."""
        started = self._busy_since
        return 0.0 if started is None else time.monotonic() - started

    def close(self) -> None:
        """Stop after the batches already queued; later submissions are never run."""
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                if self._prepare is not None:
                    self._ready.put(None)
                return
            if self._prepare is None:
                self._run_timed(batch)
                continue
            prepared = self._prepared(batch)
            if prepared:
                self._ready.put(prepared)

    def _prepared(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """The batch with each item as `prepare` made it; a `prepare` that raises fails the
        whole batch (it is not an item's fault: per-item trouble belongs in the items)."""
        live = [pending for pending in batch if not pending.future.cancelled()]
        if not live:
            return []
        assert self._prepare is not None
        try:
            items = self._prepare([pending.item for pending in live])
            if len(items) != len(live):
                raise RuntimeError(f"prepare returned {len(items)} items for {len(live)}")
        except Exception as error:
            self._after_failure(live, error, split=False)
            return []
        return [replace(pending, item=item) for pending, item in zip(live, items, strict=True)]

    def _run_ready(self) -> None:
        while True:
            batch = self._ready.get()
            if batch is None:
                return
            self._queue.put(_WAKE)  # a collection held back by this batch may end now
            self._run_timed(batch)

    def _run_timed(self, batch: list[_Pending[T, R]]) -> None:
        self._busy_since = time.monotonic()
        try:
            self._run(batch)
        finally:
            self._busy_since = None

    def _collect(self) -> list[_Pending[T, R]] | None:
        first = self._carry or self._queue.get()
        while isinstance(first, _Wake):  # nothing was waiting for company
            first = self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, size = [first], first.units
        deadline = first.submitted + self._max_wait
        while size < self._max_size:
            held = self._held_back()
            if not held and self._nobody_else_coming(batch):
                break  # waiting would only add latency
            pending = self._next(None if held else deadline)
            if pending is _CLOSING:
                break  # close() while collecting: run what we have, then stop
            if pending is None:  # the deadline, or a wake: look at everything again
                late = time.monotonic() >= deadline
                if self._queue.empty() and late and not self._held_back():
                    break
                continue
            assert isinstance(pending, _Pending)
            if size + pending.units > self._max_size:
                self._carry = pending
                break
            batch.append(pending)
            size += pending.units
        return batch

    def _nobody_else_coming(self, batch: list[_Pending[T, R]]) -> bool:
        if self._expecting is None or not any(pending.eager for pending in batch):
            return False
        return self._expecting() <= 0 and self._queue.empty()

    def _held_back(self) -> bool:
        """Whether a batch collected now could not reach the model any sooner: a prepared batch
        still waits for it, so the one after may keep gathering company for free (it is
        prepared once that batch starts, while it runs; the model thread queues a wake when it
        takes the prepared batch)."""
        return self._prepare is not None and self._ready.full()

    def _next(self, deadline: float | None) -> _Pending[T, R] | _Closing | None:
        """The next queued item, waiting until `deadline` (None: until something is queued;
        the model thread queues a wake when it takes the prepared batch); None for a wake or
        the deadline."""
        try:
            pending = self._queue.get_nowait()
        except queue.Empty:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                pending = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
        if isinstance(pending, _Wake):
            return None  # the caller looks at the queue, the deadline and `expecting` again
        if pending is None:  # close() while collecting: the collection ends, then the loop
            self._queue.put(None)
            return _CLOSING
        return pending

    def _run(self, batch: list[_Pending[T, R]]) -> None:
        live = [pending for pending in batch if not pending.future.cancelled()]
        if not live:
            return
        self.stats.calls += 1
        try:
            results = self._run_batch([pending.item for pending in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch returned {len(results)} results for {len(live)} items")
        except Exception as error:
            self._after_failure(live, error)
            return
        self._count(live)
        for pending, result in zip(live, results, strict=True):
            _resolve(pending.future, result=result)

    def _after_failure(
        self, batch: list[_Pending[T, R]], error: Exception, split: bool = True
    ) -> None:
        if len(batch) == 1 or not split or not self._splits_on(error):
            # One item, or an error no item caused (a database outage): all share it at once.
            self._count(batch)
            for pending in batch:
                _resolve(pending.future, error=error)
            return
        log.warning("batch of %d failed (%s); retrying it in halves", len(batch), error)
        # The error's traceback holds the failed call's frames and, in them, what it built
        # (a stacked batch, activations on the GPU): cleared first (with those of the errors
        # it was raised from), or the halves run with that memory still taken. The error's
        # message and frame list stay for the log line above.
        clear_frames(error)
        self.stats.splits += 1
        middle = len(batch) // 2
        self._run(batch[:middle])
        self._run(batch[middle:])

    def _count(self, batch: list[_Pending[T, R]]) -> None:
        units = sum(pending.units for pending in batch)
        self.stats.items += len(batch)
        self.stats.units += units
        self.stats.last_batch_units = units


def clear_frames(error: BaseException | None) -> None:
    """Drop the locals of the finished frames in `error`'s traceback and in those of the errors
    it was raised from: what a failed call allocated is freed now, while its message and frame
    list stay for a log line."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _resolve(future: Future[R], *, result: R | None = None, error: Exception | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:  # the waiting task gave up (its deadline passed) and cancelled
        pass
