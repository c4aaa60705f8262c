"""A listing's images fetched: each ends fetched (its bytes and their SHA-256), unchanged (a
conditional request's answer), failed with its one-line reason, or transiently failed (the job
is retried). No torch here: a decode process (`worker.decode_child`) fetches with the same code
as the worker's threads."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

from contract.errors import FetchTimeout, ListingError, TransientError
from worker.fetch import FetchPolicy, NotModified, Validators, fetch_image

if TYPE_CHECKING:
    from worker.decode_child import DecodedForModel

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class ImageRequest:
    """One URL of a listing to fetch; with `known_sha256` and `validators` (from its last fetch)
    the request is conditional."""

    position: int
    url: str
    known_sha256: str | None = None
    validators: Validators | None = None


@dataclass(frozen=True)
class FetchedBytes:
    """One URL of a listing, fetched: its bytes and their SHA-256 (its content address).
    Fetched by a decode process, it comes `decoded` already (its pixels and facts, or why it
    cannot be used), and its bytes stay there (`data` empty)."""

    position: int
    url: str
    data: bytes
    sha256: str
    validators: Validators = field(default_factory=Validators)
    decoded: DecodedForModel | str | None = None


@dataclass(frozen=True)
class Unchanged:
    """One URL of a listing whose server said it still holds the content fetched before."""

    position: int
    url: str
    sha256: str
    validators: Validators | None


@dataclass(frozen=True)
class FailedImage:
    """An image that cannot be used, with its one-line reason."""

    position: int
    url: str
    error: str


Fetched = FetchedBytes | Unchanged | FailedImage

# Fetches done elsewhere (a pool of decode processes): requests, policy, deadline.
FetchMany = Callable[
    [Sequence[ImageRequest], FetchPolicy, float | None], list[Fetched | TransientError]
]


def fetch_images(
    urls: Sequence[str],
    policy: FetchPolicy,
    executor: Executor,
    deadline: float | None = None,
    elsewhere: FetchMany | None = None,
) -> list[Fetched]:
    """Fetch every URL of one listing at once; failures become per-image errors, and a
    transient one is raised (the job is retried). `deadline` (monotonic seconds): the end of
    the job's attempt, see `fetch_each`."""
    requests = [ImageRequest(i, url) for i, url in enumerate(urls)]
    results = fetch_each(requests, policy, executor, deadline, elsewhere)
    transient = [r for r in results if isinstance(r, TransientError)]
    if transient:
        raise transient[0]
    return [r for r in results if not isinstance(r, TransientError)]


def fetch_each(
    requests: Sequence[ImageRequest],
    policy: FetchPolicy,
    executor: Executor,
    deadline: float | None = None,
    elsewhere: FetchMany | None = None,
) -> list[Fetched | TransientError]:
    """Fetch many URLs at once (a run's chunk: many listings); each ends fetched, unchanged,
    failed or transiently failed, in the order asked. `elsewhere`: where they are fetched
    instead of `executor`'s threads (the decode processes, which decode them too).

    `deadline`: an attempt's end (LV_TASK_TIME_LIMIT from its claim). No fetch runs past it,
    so no attempt outlives its time limit (nor the broker's visibility timeout, which would
    deliver the job again while it still runs); one cut short by it failed for the attempt's
    lack of time, not the host's slowness: transient, retried."""
    if elsewhere is not None and requests:
        return elsewhere(requests, policy, deadline)
    return map_items(lambda request: fetch_one(request, policy, deadline), requests, executor)


def fetch_one(
    request: ImageRequest, policy: FetchPolicy, deadline: float | None
) -> Fetched | TransientError:
    """One image, as `fetch_each` fetches it (`deadline` on the monotonic clock, which every
    process on the host shares)."""
    position, url = request.position, request.url
    validators = request.validators if request.known_sha256 else None
    cut = False
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            return TransientError(
                f"image {position} not fetched: the attempt ran past LV_TASK_TIME_LIMIT"
            )
        if left < policy.timeout:
            policy, cut = replace(policy, timeout=left), True
    try:
        fetched = fetch_image(url, policy, validators)
    except FetchTimeout as error:
        if cut:
            return TransientError(f"{error}, the rest of the attempt's LV_TASK_TIME_LIMIT")
        return FailedImage(position, url, str(error))
    except ListingError as error:
        return FailedImage(position, url, str(error))
    except TransientError as error:
        return error
    if isinstance(fetched, NotModified):
        assert request.known_sha256 is not None  # only asked with a known content
        return Unchanged(position, url, request.known_sha256, validators)
    # The content address, computed once: unchanged bytes are never embedded twice by a model.
    sha256 = hashlib.sha256(fetched.data).hexdigest()
    return FetchedBytes(position, url, fetched.data, sha256, fetched.validators)


def map_items(work: Callable[[A], B], items: Sequence[A], executor: Executor) -> list[B]:
    """`executor.map`, except that one item runs in the calling thread: a listing's only image
    does not pay a hand-off to another thread and back."""
    if len(items) == 1:
        return [work(items[0])]
    return list(executor.map(work, items))
