"""The group message's shape, and how a group's failure reads in Flower (no server needed)."""

from __future__ import annotations

import uuid

import pytest

from contract.broker import MAX_GROUP, GroupMessage
from contract.settings import load_settings
from worker.tasks import group_failure


def test_a_group_message_round_trips_its_job_ids_as_json_strings() -> None:
    ids = tuple(uuid.uuid4() for _ in range(3))
    kwargs = GroupMessage(ids).kwargs()
    assert kwargs == {"job_ids": [str(i) for i in ids]}
    assert GroupMessage.parse(kwargs["job_ids"]).job_ids == ids


@pytest.mark.parametrize("count", [0, MAX_GROUP + 1])
def test_an_empty_or_oversized_group_message_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match="group message holds"):
        GroupMessage.parse([str(uuid.uuid4()) for _ in range(count)])


def test_a_group_message_with_a_job_id_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError):
        GroupMessage.parse(["not-a-uuid"])


def test_a_groups_failure_names_its_failed_listings_and_counts_the_rest() -> None:
    summary = {"jobs": 16, "failed": 7, "errors": {"a": "HTTP 404", "b": "not an image"}}
    assert group_failure(summary) == (
        "7 of 16 listings failed: a: HTTP 404; b: not an image; and 5 more"
    )


@pytest.mark.parametrize("value", ["0", "257"])
def test_enqueue_group_is_bounded(value: str) -> None:
    with pytest.raises(ValueError):
        load_settings(enqueue_group=value)
