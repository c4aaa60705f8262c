"""Beat's watch gives up on a left-open run after a few tries in a row, never while a build
runs somewhere."""

from __future__ import annotations

import uuid

from listing_vision.beat import CompletionTries


def test_the_fifth_try_in_a_row_is_the_last() -> None:
    tries = CompletionTries(limit=5)
    run = uuid.uuid4()

    answers = [tries.next_is_last(run, someone_building=False) for _ in range(5)]

    assert answers == [False, False, False, False, True]


def test_tries_while_some_process_builds_do_not_count() -> None:
    tries = CompletionTries(limit=2)
    run = uuid.uuid4()

    assert not tries.next_is_last(run, someone_building=False)
    for _ in range(10):  # a build of hours, somewhere
        assert not tries.next_is_last(run, someone_building=True)
    assert tries.next_is_last(run, someone_building=False)


def test_a_run_no_longer_left_open_starts_again_from_nothing() -> None:
    tries = CompletionTries(limit=2)
    run, other = uuid.uuid4(), uuid.uuid4()
    tries.next_is_last(run, someone_building=False)
    tries.next_is_last(other, someone_building=False)

    tries.still_open([other])  # `run` was completed (or resumed and left open again later)

    assert not tries.next_is_last(run, someone_building=False)
    assert tries.next_is_last(other, someone_building=False)
