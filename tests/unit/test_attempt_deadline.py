"""An attempt's time limit bounds its fetches too (issue 14, fault 5): no attempt outlives
LV_TASK_TIME_LIMIT, so none outlives the visibility timeout and is delivered twice while it
runs; and retries never wait so long that their held message is delivered again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from contract.errors import TransientError
from contract.settings import load_settings
from tests.unit.fetch_servers import Running, serve
from tests.unit.test_fetch import policy
from worker.image_fetch import FailedImage, ImageRequest, fetch_each
from worker.runtime import retry_ceiling


@pytest.fixture
def server() -> Iterator[Running]:
    with serve() as running:
        yield running


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_a_fetch_cut_by_the_attempts_time_limit_is_retried_not_failed(
    server: Running, executor: ThreadPoolExecutor
) -> None:
    # The host answers within LV_FETCH_TIMEOUT (5 s) but not within the 1 s left of the attempt.
    request = ImageRequest(0, f"{server.base_url}/stall")
    [outcome] = fetch_each([request], policy(timeout=5.0), executor, time.monotonic() + 1.0)
    assert isinstance(outcome, TransientError), outcome
    assert "LV_TASK_TIME_LIMIT" in str(outcome) and "timed out" in str(outcome)


def test_a_host_slower_than_its_own_deadline_still_fails_the_image(
    server: Running, executor: ThreadPoolExecutor
) -> None:
    request = ImageRequest(0, f"{server.base_url}/stall")
    [outcome] = fetch_each([request], policy(timeout=1.0), executor, time.monotonic() + 30)
    assert isinstance(outcome, FailedImage) and outcome.error.endswith("timed out after 1s")


def test_no_fetch_starts_once_the_attempt_is_over(
    server: Running, executor: ThreadPoolExecutor
) -> None:
    requests = [ImageRequest(i, f"{server.base_url}/image.jpg") for i in range(2)]
    outcomes = fetch_each(requests, policy(), executor, time.monotonic() - 0.1)
    assert all(isinstance(o, TransientError) for o in outcomes), outcomes
    assert server.requests == []


@pytest.mark.parametrize(
    ("visibility", "time_limit", "ceiling"), [(3600, 300, 1650.0), (8, 5, 1.5), (61, 60, 0.5)]
)
def test_a_retry_waits_at_most_half_of_what_the_time_limit_leaves_of_the_visibility_timeout(
    visibility: int, time_limit: int, ceiling: float
) -> None:
    settings = load_settings(visibility_timeout=visibility, task_time_limit=time_limit)
    assert retry_ceiling(settings) == ceiling
    # A retry held that long, then run to its limit, is still acknowledged in time.
    assert ceiling + time_limit < visibility
